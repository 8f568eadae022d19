"""Optional dependencies: which extra installs what, and the error that says so.

The core install (``pip install ca-flax``) is the library: models, attention blocks,
layers, checkpoints, inference, conversion of ``.safetensors``/``.npz`` weights and the
native CPU kernels. The rest needs an extra (``pyproject.toml``)::

    train   the trainer: train.py, ca_flax.training, ca_flax.data, ca_flax.evaluate
    viz     python -m ca_flax.predict / visualize (matplotlib; TensorFlow decodes images)
    export  python -m ca_flax.export (TensorFlow, LiteRT, ONNX)
    torch   reading PyTorch pickles (.pth/.pt/.bin) in ca_flax.convert

A module that needs one calls :func:`require` before its imports, e.g.::

    require("ca_flax.training", "train")

which raises :class:`MissingExtraError` (an ``ImportError``) when a package is missing::

    ca_flax.training needs the trainer's dependencies: pip install 'ca-flax[train]'
    (missing: tensorflow_datasets)

The check looks packages up (``importlib.util.find_spec``) without importing them, so a
guarded module stays as cheap to import as before (TensorFlow is still imported on first
use where it was).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

# The import names each extra's packages provide, as far as ca-flax imports them directly.
# The trainer draws pictures only if matplotlib is there (a warning otherwise), so it is
# in the extra but not required here; tensorboard comes with TensorFlow.
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "train": ("tensorflow", "tensorflow_datasets", "clu", "ml_collections", "absl", "sklearn"),
    "viz": ("matplotlib", "tensorflow"),
    "export": ("tensorflow", "ai_edge_litert", "tf2onnx", "onnx", "onnxruntime"),
    "torch": ("torch",),
}

_WHAT = {
    "train": "the trainer's dependencies",
    "viz": "the picture dependencies",
    "export": "the export dependencies",
    "torch": "PyTorch",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or blocked in sys.modules
        return False


def missing(modules: Sequence[str]) -> list[str]:
    """The names among ``modules`` that are not installed, in order."""
    return [m for m in modules if not installed(m)]


def message(user: str, extra: str, missing_modules: Sequence[str]) -> str:
    """``'<user> needs <what>: pip install 'ca-flax[<extra>]' (missing: a, b)'``."""
    return (f"{user} needs {_WHAT.get(extra, f'the {extra} extra')}: pip install 'ca-flax[{extra}]' "
            f"(missing: {', '.join(missing_modules)})")


def require(user: str, extra: str, modules: Sequence[str] | None = None) -> None:
    """Raises :class:`MissingExtraError` naming ``extra`` unless ``modules`` are installed.

    Args:
      user: what needs them, as the user knows it (``'ca_flax.training'``, ``'train.py'``).
      extra: the extra that installs them (a key of :data:`EXTRA_MODULES`).
      modules: top-level import names to check; by default the extra's own list.
    """
    absent = missing(EXTRA_MODULES[extra] if modules is None else modules)
    if absent:
        raise MissingExtraError(message(user, extra, absent))
