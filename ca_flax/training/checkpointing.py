"""Orbax checkpoints of a training run: the state, where the input stood, and eval results.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. Orbax writes every checkpoint into a
temporary directory (``<step>.orbax-checkpoint-tmp``) and renames it when complete, so a
run killed mid-save leaves no checkpoint that looks valid, and ``latest_step`` never
returns one; the next run removes such leftovers (:func:`remove_unfinished`). Saves are
asynchronous: training continues while the previous checkpoint is written.

A resume takes the newest step that reads and fits: one that does not fit the run's
state is refused (:class:`~ca_flax.checkpoints.CheckpointMismatchError`, nothing
changed); an unreadable newer one is moved aside to ``<step>.corrupt`` (kept for
inspection, out of the keep-N count) once an older one has read.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from ca_flax.checkpoints import (
    METADATA_FILE, CheckpointMismatchError, read_newest_intact, summarize, variables_mismatch,
)
from ca_flax.training.state import TrainState
from ca_flax.training.workdir import describe, differences

CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "eval_top1"


class CheckpointManager:
    """Saves and restores ``TrainState`` plus JSON metadata; keeps the last ``keep``
    checkpoints and the one with the best ``eval_top1``."""

    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}.")
        policy = preservation.AnyPreservationPolicy(
            [
                preservation.LatestN(n=keep),
                preservation.BestN(
                    get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policy, enable_async_checkpointing=async_save, create=True,
            ),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: TrainState, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        """Starts saving ``state`` at its step (asynchronously); ``metrics`` rank it."""
        step = int(jax.device_get(state.step))
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(_savable(state)), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
        )

    def restore(
        self, target: TrainState, step: int | None = None, settings: dict[str, Any] | None = None
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restores into the shapes and shardings of ``target`` (arrays or
        ``ShapeDtypeStruct``s; latest step by default), after checking that the step's
        arrays fit them (:class:`~ca_flax.checkpoints.CheckpointMismatchError`, naming
        what differs from ``settings``, the run's optimizer settings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _savable(target))
        self._check_fits(step, abstract, settings or {})
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return target.replace(**restored["state"]), dict(restored["meta"])

    def restore_latest_intact(
        self, target: TrainState, settings: dict[str, Any]
    ) -> tuple[TrainState, dict[str, Any], list[tuple[int, str, Path]]] | None:
        """The newest step that reads, restored into ``target`` (None without any step),
        and ``(step, what was wrong, where it went)`` for each newer one that did not,
        moved aside (by process 0) so that the keep-N policy keeps counting good ones.
        ``settings`` (the run's optimizer settings, saved in each step's meta) name what
        changed when a step does not fit."""
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        read = lambda step: self.restore(target, step, settings)  # noqa: E731
        _, (state, meta), damaged = read_newest_intact(self.directory, steps, read)
        moved = [(step, reason, set_aside(self.directory, step)) for step, reason in damaged
                 if jax.process_index() == 0]
        if damaged:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("ca_flax: damaged checkpoints set aside")
            self._manager.reload()
        return state, meta, moved

    def _check_fits(self, step: int, abstract: dict[str, Any], settings: dict[str, Any]) -> None:
        """Refuses a step whose saved arrays do not fit ``abstract`` (another model, or
        an optimizer of another structure) in one paragraph, before Orbax would list its
        tree diff; unreadable metadata is left to the restore, as damage."""
        stored = self._manager.item_metadata(step)["state"]
        if stored is None:
            return
        flat = lambda tree: ocp.tree.to_flat_dict(tree, sep="/")  # noqa: E731 - Orbax's own path names
        problems = variables_mismatch(flat(abstract), flat(stored.tree))
        if not problems:
            return
        parts = sorted({line.split("/")[0].split(" ")[-1] for line in problems})  # params, opt_state, ...
        if parts == ["opt_state"]:
            try:
                changed = differences(self.read_meta(step)["settings"], settings)
            except Exception:  # noqa: BLE001 - older or damaged meta: the arrays' paths say enough
                changed = {}
            cause = (f"The settings changed: {describe(changed)}." if changed else
                     "The optimizer changed (its settings, or its code in ca_flax/training/optim.py).")
        else:
            cause = f"The model differs from the one {METADATA_FILE} records: {METADATA_FILE} was rewritten since."
        raise CheckpointMismatchError(
            f"{self.directory / str(step)} holds a training state this run cannot continue: its "
            f"{' and '.join(parts)} differ{'s' if len(parts) == 1 else ''} from this run's ({summarize(problems)}). "
            f"{cause} "
            "Restoring it would mix two runs' states, so nothing was changed. Use another --workdir, or rerun with "
            "the settings it was trained with (docs/workdir.md)."
        )

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata saved with ``step``."""
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def best_step(self) -> int | None:
        """The kept step with the highest ``eval_top1``, if any was evaluated."""
        scored = [(self.read_meta(s).get("metrics", {}).get(BEST_METRIC), s) for s in self.all_steps()]
        scored = [(m, s) for m, s in scored if m is not None]
        return max(scored)[1] if scored else None

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _savable(state: TrainState) -> dict[str, Any]:
    """The array fields of the state (apply_fn and tx are code, rebuilt from the config)."""
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
        "rng": state.rng,
    }


def remove_unfinished(directory: Path) -> list[str]:
    """Removes the temporaries of saves that never finished (a run killed or interrupted
    mid-save) and returns their names. Only for the holder of the workdir's lock: another
    run's temporaries are its saves in progress."""
    if not directory.is_dir():
        return []
    leftovers = sorted(p for p in directory.iterdir() if ocp.utils.TMP_DIR_SUFFIX in p.name)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in leftovers]


def set_aside(directory: Path, step: int) -> Path:
    """Renames an unreadable ``<step>`` to ``<step>.corrupt`` (``.corrupt.1``, ... if
    taken): Orbax no longer counts it, and it stays for inspection."""
    target = directory / f"{step}.corrupt"
    n = 0
    while target.exists():
        n += 1
        target = directory / f"{step}.corrupt.{n}"
    (directory / str(step)).rename(target)
    return target
