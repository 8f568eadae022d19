"""matplotlib without a display, and picture files written atomically.

Figures are built as ``matplotlib.figure.Figure`` objects drawn by the Agg canvas, never
through ``pyplot``: no backend is selected or switched (a notebook's stays as it is),
nothing needs a display, and no global figure list keeps them alive.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from ca_flax._extras import MissingExtraError, message

EXTRA_HINT = "pip install 'ca-flax[viz]'"


def figure_class() -> Any:
    """``matplotlib.figure.Figure``, or :class:`MissingExtraError` naming the extra to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError(message("the pictures", "viz", ["matplotlib"])) from None
    return Figure


def new_figure(width: float, height: float) -> Any:
    """An empty Agg-backed figure of ``width`` x ``height`` inches."""
    figure = figure_class()(figsize=(width, height), layout="constrained")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    return figure


def check_output(path: str | os.PathLike[str]) -> str:
    """The picture format of ``path``, from its suffix (``.png``, ``.svg``, ``.pdf`` ...);
    ValueError before anything is computed when matplotlib cannot write it."""
    figure_class()  # the missing-extra message before any other
    from matplotlib.backend_bases import FigureCanvasBase

    if Path(path).is_dir():
        raise ValueError(f"{path}: is a directory; give a file name such as {Path(path) / 'picture.png'}.")
    suffix = Path(path).suffix.lower().lstrip(".")
    supported = FigureCanvasBase.get_supported_filetypes()
    if suffix not in supported:
        raise ValueError(f"{path}: cannot write a picture with suffix {suffix or '(none)'!r}; "
                         f"use one of {', '.join('.' + s for s in sorted(supported))}.")
    return suffix


def save_figure(figure: Any, path: str | os.PathLike[str], *, dpi: int = 100) -> Path:
    """Writes ``figure`` to ``path`` atomically: into a hidden sibling, then renamed, so a
    reader (or a run killed meanwhile) never sees half a file. Returns the path."""
    path = Path(path)
    fmt = check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        figure.savefig(tmp, format=fmt, dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def figure_pixels(figure: Any, *, dpi: int = 100) -> np.ndarray:
    """The figure rendered as a uint8 RGB array ``(height, width, 3)`` (for TensorBoard)."""
    figure.set_dpi(dpi)
    canvas = figure.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
