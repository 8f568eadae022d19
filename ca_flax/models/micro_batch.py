"""Eval-mode forward passes in micro-batches, inside a model's own ``apply``.

On CPU a large batch costs more than its images: XLA:CPU ``malloc``s a temporary buffer
sized by the batch on every call, which glibc maps fresh (a zero-filled page fault per
4 KiB), and every feature map goes out to memory and back between layers. Running the
batch a few images at a time (``nn.scan`` over micro-batches, one compiled program, the
variables shared) keeps the buffer small and reused and the maps in cache. In eval mode
BatchNorm uses its running statistics, so images are independent and the outputs are
those of one call on the whole batch.

``'auto'`` micro-batches only where that was measured to win (docs/performance.md): the
CPU backend with a single device, and not inside ``ca_flax.fast_paths.disabled()``.
With several devices a batch may be sharded by ``jax.jit`` across them, which a
sequential loop over the batch would undo; :func:`ca_flax.inference.make_predictor`
splits the batch per device first and micro-batches there. Every model family gets this
from ``models/backbone.Backbone``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import linen as nn
from jax import lax

from ca_flax import fast_paths

MicroBatch = int | str | None

# Micro-batch 'auto' stands for, by backend, where it wins (see the module docstring).
AUTO_EVAL_MICRO_BATCH = {"cpu": 8}


def resolve_eval_micro_batch(setting: MicroBatch, backend: str | None = None) -> int | None:
    """Images per step for ``setting``: an int as given, ``None`` for the whole batch,
    ``'auto'`` per backend (8 on a single-device CPU backend, else the whole batch);
    ``None`` whatever the setting inside ``ca_flax.fast_paths.disabled()``."""
    if setting == "auto":
        backend = backend or jax.default_backend()
        if not fast_paths.enabled() or backend not in AUTO_EVAL_MICRO_BATCH or jax.device_count(backend) != 1:
            return None
        return AUTO_EVAL_MICRO_BATCH[backend]
    size = check_micro_batch(setting, "eval_micro_batch")
    return size if fast_paths.enabled() else None


def check_micro_batch(setting: MicroBatch, name: str) -> int | None:
    """``setting`` if it is a positive int or None; a ValueError naming ``name`` otherwise
    (``'auto'`` is resolved by the caller, per backend)."""
    if setting is not None and (isinstance(setting, bool) or not isinstance(setting, int) or setting < 1):
        raise ValueError(f"{name}={setting!r}: use a positive int, None (whole batch) or 'auto'.")
    return setting


def eval_micro_batch_size(module: nn.Module, setting: MicroBatch, x: jax.Array, train: bool) -> int | None:
    """The micro-batch size ``module`` should run ``x`` in, or None for one pass: eval mode
    on an initialized model with no mutable collections (a scan shares the variables
    read-only), a batch larger than the micro-batch."""
    if train or module.is_initializing() or x.ndim < 1:
        return None
    if any(module.is_mutable_collection(name) for name in ("intermediates", "batch_stats", "params")):
        return None
    size = resolve_eval_micro_batch(setting)
    return size if size is not None and x.shape[0] > size else None


def pad_rows(x: jax.Array, rows: int) -> jax.Array:
    """``x`` with its leading axis zero-padded to ``rows``."""
    if x.shape[0] == rows:
        return x
    return lax.pad(x, np.zeros((), x.dtype), [(0, rows - x.shape[0], 0)] + [(0, 0, 0)] * (x.ndim - 1))


def map_micro_batches(x: jax.Array, size: int, map_chunks: Callable[[jax.Array], Any]) -> Any:
    """Splits the leading axis of ``x`` into equal steps of at most ``size`` rows
    (``ceil(N / size)`` of them, rows zero-padded to a multiple), maps them with
    ``map_chunks`` (``(steps, step, ...)`` in, outputs stacked the same way out), and
    returns the outputs merged back, the padding's dropped."""
    rows = x.shape[0]
    steps = -(-rows // size)
    step = -(-rows // steps)  # balanced: 33 rows at size 8 run as 5 steps of 7
    out = map_chunks(pad_rows(x, steps * step).reshape(steps, step, *x.shape[1:]))
    return jax.tree_util.tree_map(lambda y: y.reshape(steps * step, *y.shape[2:])[:rows], out)


def in_micro_batches(module: nn.Module, fn: Callable[[nn.Module, jax.Array], Any], x: jax.Array, size: int) -> Any:
    """``fn(module, x)`` computed over the leading axis of ``x`` at most ``size`` rows at a
    time, sequentially, the variables shared (:func:`map_micro_batches`). ``fn``'s
    outputs must have the batch as their leading axis."""

    def scan(chunks):
        body = nn.scan(lambda mdl, carry, chunk: (carry, fn(mdl, chunk)), variable_broadcast=True, split_rngs={},
                       length=chunks.shape[0])
        return body(module, None, chunks)[1]

    return map_micro_batches(x, size, scan)


__all__ = [
    "AUTO_EVAL_MICRO_BATCH", "MicroBatch", "check_micro_batch", "eval_micro_batch_size", "in_micro_batches",
    "map_micro_batches", "pad_rows", "resolve_eval_micro_batch",
]
