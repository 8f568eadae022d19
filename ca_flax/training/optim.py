"""Optimizer and learning-rate schedule from a config (optax)."""

from __future__ import annotations

from typing import Any

import jax
import optax


def scaled_learning_rate(config: Any) -> float:
    """Peak learning rate: ``learning_rate`` is given for a batch of 256 and scaled
    linearly with the global batch (the paper: 0.05 at 256)."""
    return config.learning_rate * config.batch_size / 256.0


def learning_rate_schedule(config: Any, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_epochs``, then cosine decay to 0 at the end."""
    peak = scaled_learning_rate(config)
    warmup = min(int(config.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=0.0
    )


def _decay_mask(params: Any, exclude_norm_and_bias: bool) -> Any:
    """True where weight decay applies: everywhere (PyTorch's default, as the paper's
    recipe), or only on conv/dense kernels."""
    if not exclude_norm_and_bias:
        return jax.tree_util.tree_map(lambda _: True, params)
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def create_optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with momentum and PyTorch-style (coupled, L2) weight decay, as in the paper.

    ``config.grad_clip_norm > 0`` first rescales the gradient to at most that global
    norm (``torch.nn.utils.clip_grad_norm_``'s rule, before weight decay): a guard against
    the rare step whose gradient is orders of magnitude above the rest, which a small
    batch on a tiny network can produce. 0 (the paper's recipe) leaves gradients as
    they are.
    """
    if config.optimizer != "sgd":
        raise ValueError(f"Unknown optimizer {config.optimizer!r}; the supported one is 'sgd'.")
    clip = float(config.get("grad_clip_norm", 0.0) or 0.0)
    if clip < 0:
        raise ValueError(f"grad_clip_norm must be >= 0 (0 turns clipping off), got {clip}.")
    exclude = bool(config.get("weight_decay_exclude_norm_and_bias", False))
    sgd = optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=lambda p: _decay_mask(p, exclude)),
        optax.sgd(schedule, momentum=config.momentum, nesterov=bool(config.get("nesterov", False))),
    )
    return _clip_before(sgd, clip) if clip else sgd


def _clip_before(inner: optax.GradientTransformation, max_norm: float) -> optax.GradientTransformation:
    """``inner`` applied to gradients clipped to ``max_norm`` global norm, with
    ``inner``'s state unchanged (clipping keeps none), so a workdir resumes whether or
    not clipping is turned on."""
    clip = optax.clip_by_global_norm(max_norm)

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        clipped, _ = clip.update(updates, optax.EmptyState())
        return inner.update(clipped, state, params)

    return optax.GradientTransformation(inner.init, update)
