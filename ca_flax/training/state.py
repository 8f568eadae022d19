"""The training state: parameters, BatchNorm statistics, optimizer state and RNG."""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import struct
from flax.training import train_state


class TrainState(train_state.TrainState):
    """Flax's ``TrainState`` plus ``batch_stats`` and a base ``rng`` key.

    Per-step randomness (dropout) is ``fold_in(rng, step)``, so it is a function of the
    step alone and a resumed run draws exactly what an uninterrupted one would.
    """

    batch_stats: Any = None
    rng: jax.Array = struct.field(default=None)

    def variables(self) -> dict[str, Any]:
        """``{'params', 'batch_stats'}`` for ``model.apply``."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(
    model: Any, variables: dict[str, Any], tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """A step-0 state for ``model`` from initialized (or imported) ``variables``."""
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
        rng=rng,
    )
