"""Pure train and eval steps. Sharding comes from the caller's ``jax.jit``: with the
batch sharded over the mesh's ``data`` axis, every mean below (the loss, BatchNorm's
statistics) is over the global batch."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax

from ca_flax.inference import PredictFn
from ca_flax.training.state import TrainState


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
    """Per-example softmax cross-entropy in float32, with optional label smoothing."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing) if label_smoothing else (
        jax.nn.one_hot(labels, num_classes)
    )
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the ``k`` largest logits."""
    k = min(k, logits.shape[-1])
    _, top = jax.lax.top_k(logits.astype(jnp.float32), k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def train_step(
    state: TrainState, batch: dict[str, jax.Array], *, num_classes: int, label_smoothing: float = 0.0
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step; returns the new state and ``{'loss', 'top1', 'grad_norm'}`` (the
    gradient's global norm before any clipping: the first thing to look at when a run
    diverges)."""
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_rng},
        )
        loss = jnp.mean(cross_entropy(logits, batch["label"], num_classes, label_smoothing))
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {"loss": loss, "top1": jnp.mean(top_k_correct(logits, batch["label"], 1)),
               "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics


def train_steps(
    state: TrainState, batches: dict[str, jax.Array], *, num_classes: int, label_smoothing: float = 0.0
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``k`` train steps in one program: ``batches`` holds ``k`` batches stacked on a new
    leading axis, and the metrics come back stacked the same way (``{'loss': (k,), ...}``).

    A ``lax.scan`` of :func:`train_step`, so the updates are exactly the sequence of
    single steps. On CPU it is faster: XLA:CPU allocates a call's temporary memory
    afresh on every call, and pays a page fault for each 4 KiB of it; ``k`` steps per call
    pay once for ``k`` (see ``trainer.steps_per_call``; measured in docs/training.md).
    """

    def one(carry: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        return train_step(carry, batch, num_classes=num_classes, label_smoothing=label_smoothing)

    return jax.lax.scan(one, state, batches)


def eval_step(
    state: TrainState, batch: dict[str, jax.Array], *, num_classes: int, predict: PredictFn | None = None
) -> dict[str, jax.Array]:
    """Sums over the unmasked examples of one batch: loss, top-1, top-5 and count.

    ``predict(variables, images)`` computes the logits (``ca_flax.inference.predict_fn``:
    sharded, in micro-batches); ``None`` is one ``state.apply_fn`` call in eval mode.
    """
    if predict is None:
        logits = state.apply_fn(state.variables(), batch["image"], train=False)
    else:
        logits = predict(state.variables(), batch["image"])
    mask = batch["mask"].astype(jnp.float32)
    losses = cross_entropy(logits, batch["label"], num_classes, 0.0)
    return {
        "loss_sum": jnp.sum(losses * mask),
        "top1_sum": jnp.sum(top_k_correct(logits, batch["label"], 1) * mask),
        "top5_sum": jnp.sum(top_k_correct(logits, batch["label"], 5) * mask),
        "count": jnp.sum(mask),
    }
