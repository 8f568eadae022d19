"""Orbax checkpoints of a training run: the state, where the input stood, and eval results.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. Orbax writes every checkpoint into a
temporary directory and renames it when complete, so a run killed mid-save leaves no
checkpoint that looks valid, and ``latest_step`` never returns one. Saves are
asynchronous: training continues while the previous checkpoint is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from ca_flax.training.state import TrainState

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
            item_names=("state", "meta"),
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

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """Restores into the shapes and shardings of ``target`` (latest step by default)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _savable(target))
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return target.replace(**restored["state"]), dict(restored["meta"])

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
