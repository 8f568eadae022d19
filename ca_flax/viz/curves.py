"""Training curves from ``WORKDIR/metrics.jsonl``: loss, accuracy and learning rate.

``metrics.jsonl`` holds one JSON object per line, each with ``step``: training lines
``train_loss``, ``train_top1``, ``learning_rate`` (and ``images_per_sec``, maybe
``train_grad_norm``), evaluation lines ``eval_top1``, ``eval_top5``, ``eval_loss``.
Non-finite values are written as strings (``"nan"``) and read back as floats.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ca_flax.viz.plotting import new_figure

METRICS_FILE = "metrics.jsonl"
# (metric, panel title), in the order of the 2 x 2 grid.
PANELS: tuple[tuple[str, str], ...] = (
    ("train_loss", "train loss"),
    ("eval_top1", "eval top-1"),
    ("eval_top5", "eval top-5"),
    ("learning_rate", "learning rate"),
)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run's metrics.

    Attributes:
      name: its label in the legend.
      records: the lines of ``metrics.jsonl``, in order.
      steps_per_epoch: for the epoch axis; None when unknown.
    """

    name: str
    records: tuple[dict[str, Any], ...]
    steps_per_epoch: float | None = None

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of every line that has ``key``, in file order."""
        rows = [(r["step"], float(r[key])) for r in self.records if key in r]
        steps = np.array([s for s, _ in rows], np.int64)
        return steps, np.array([v for _, v in rows], np.float64)


def read_metrics(path: str | os.PathLike[str]) -> tuple[dict[str, Any], ...]:
    """The records of a ``metrics.jsonl`` file; ValueError naming the line when one is not
    a JSON object with a ``step``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such metrics file (a training workdir has {METRICS_FILE}).")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg}).") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{number}: not a metrics line (a JSON object with \"step\").")
        records.append(record)
    return tuple(records)


def read_steps_per_epoch(workdir: str | os.PathLike[str]) -> float | None:
    """Steps per epoch of a training workdir, from its latest checkpoint's metadata
    (``step / epoch``); None when there is none."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return None
    try:
        import orbax.checkpoint as ocp  # slow to import: only here

        with ocp.CheckpointManager(directory.absolute(), item_names=("state", "meta")) as manager:
            step = manager.latest_step()
            if step is None:
                return None
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return float(meta["step"]) / float(meta["epoch"]) if meta.get("epoch") else None
    except Exception:  # the epoch axis is an extra: without it the curves are still drawn
        return None


def read_run(workdir: str | os.PathLike[str], name: str | None = None, *,
             steps_per_epoch: float | None = None) -> Run:
    """The run in ``workdir``, named after the directory unless ``name`` is given; its
    steps per epoch as given, else from its checkpoints (:func:`read_steps_per_epoch`)."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ValueError(f"{workdir}: no such training workdir.")
    records = read_metrics(workdir / METRICS_FILE)
    return Run(name or workdir.absolute().name, records, steps_per_epoch or read_steps_per_epoch(workdir))


def _markers(points: int) -> dict[str, Any]:
    """Dots on sparse lines (a few evaluations), where a lone point would not show."""
    return {"marker": "o", "markersize": 3} if points < 20 else {}


def plot_curves(runs: Sequence[Run], *, title: str | None = None) -> Any:
    """Train loss, eval top-1, eval top-5 and learning rate against step, the runs
    overlaid (one colour each, named in the legend). Eval loss is drawn dashed with the
    train loss, train top-1 dotted with the eval top-1. When every run has the same
    steps per epoch, the top axis counts epochs. Returns the matplotlib Figure; each
    line's label is ``'<run>'`` (``'<run> eval'`` / ``'<run> train'`` for the extra
    ones) and its ``gid`` the metric it draws.
    """
    if not runs:
        raise ValueError("no runs to plot.")
    figure = new_figure(10, 6.5)
    axes = figure.subplots(2, 2, sharex=True).ravel()
    extras = {"train_loss": ("eval_loss", "--", "eval"), "eval_top1": ("train_top1", ":", "train")}
    epoch_sizes = {r.steps_per_epoch for r in runs}
    epoch_size = next(iter(epoch_sizes)) if len(epoch_sizes) == 1 else None
    for ax, (key, panel) in zip(axes, PANELS):
        for i, run in enumerate(runs):
            colour = f"C{i % 10}"
            steps, values = run.series(key)
            ax.plot(steps, values, color=colour, label=run.name, gid=key, **_markers(len(steps)))
            if key in extras:
                other, style, suffix = extras[key]
                steps, values = run.series(other)
                if len(steps):
                    ax.plot(steps, values, color=colour, linestyle=style, label=f"{run.name} {suffix}", gid=other,
                            **_markers(len(steps)))
        ax.set_title(panel + (" (dashed: eval loss)" if key == "train_loss" else "")
                     + (" (dotted: train top-1)" if key == "eval_top1" else ""), fontsize=9)
        if ax in axes[2:]:  # the bottom row; the top row shares its step axis
            ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if epoch_size:
            top = ax.secondary_xaxis("top", functions=(lambda s: s / epoch_size, lambda e: e * epoch_size))
            top.set_xlabel("epoch", fontsize=8)
            top.tick_params(labelsize=7)
    handles = [line for line in axes[0].get_lines() if line.get_gid() == "train_loss"]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure
