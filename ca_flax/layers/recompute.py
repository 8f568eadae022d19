"""Backward-pass work that XLA must not start before the backward pass reaches it.

A hand-written backward pass often derives large temporaries from forward values alone
(a padded copy of a layer's input, its phase planes, a recomputed normalization). XLA
is then free to compute them early, and XLA:CPU did: it hoisted them into the forward
pass, where those of every layer sat in memory at once at the start of the backward
pass (nearly twice the train step's temporary memory; docs/performance.md).
``lax.optimization_barrier`` does not keep them in place on XLA:CPU. :func:`after`
makes the forward values data-dependent on the incoming cotangent instead, so nothing
derived from them can run before the cotangent exists; :func:`recompute_in_backward` is
the recomputation ``jax.checkpoint`` does, built on it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax import lax


def after(x: jax.Array, cotangent: jax.Array) -> jax.Array:
    """``x`` unchanged, but computed from ``cotangent``, so XLA cannot schedule anything
    derived from it before ``cotangent`` exists.

    Adds ``0 * corner`` to ``x``, where ``corner`` is ``cotangent`` with every axis but
    the first and the last cut to its first entry (``(N, 1, .., 1, C)`` for a feature
    map; the last axis too where ``x`` has another channel count, as a convolution's
    input; a 1-D cotangent such as a per-channel statistic is used whole), broadcast
    against ``x``. Batch- or channel-sharded arrays keep their slices on their devices,
    so no communication is added; IEEE arithmetic forbids the compiler to drop the
    multiply by zero, and XLA fuses the add into the first kernel that reads ``x``. A
    NaN or infinite cotangent entry makes ``x`` NaN, where the gradient is non-finite
    anyway.
    """
    if cotangent.ndim >= 2:
        channels = cotangent.shape[-1] if cotangent.shape[-1] == x.shape[-1] else 1
        corner = (cotangent.shape[0],) + (1,) * (cotangent.ndim - 2) + (channels,)
        cotangent = lax.slice(cotangent, (0,) * cotangent.ndim, corner)
    # lax primitives, not jnp operators: this runs for every layer of a traced step.
    zero = lax.mul(cotangent, np.zeros((), cotangent.dtype)).astype(x.dtype)
    return lax.add(x, lax.broadcast_in_dim(zero, x.shape, tuple(range(x.ndim - zero.ndim, x.ndim))))


def recompute_in_backward(
    fn: Callable[..., Any], static_argnums: tuple[int, ...] = (), forward: Callable[..., Any] | None = None
) -> Callable[..., Any]:
    """``fn`` whose backward pass keeps only its (non-static) arguments and recomputes
    everything else from them once the output's cotangent arrives: the first argument
    (the feature map; the output has its batch axis, and its first output is the one
    tied) goes through :func:`after`. Gradients are autodiff's of ``fn``.
    ``static_argnums``: positions of hashable non-array arguments (settings).
    ``forward``: computes ``fn``'s outputs from the same arguments in the forward pass
    (a faster formulation of the same values, such as a native kernel); default ``fn``."""
    static = tuple(sorted(static_argnums))

    def merge(statics: tuple[Any, ...], arrays: tuple[Any, ...]) -> list[Any]:
        s, a = iter(statics), iter(arrays)
        return [next(s) if i in static else next(a) for i in range(len(statics) + len(arrays))]

    forward = forward or fn
    wrapped = jax.custom_vjp(forward, nondiff_argnums=static)

    def fwd(*args):
        return forward(*args), tuple(a for i, a in enumerate(args) if i not in static)

    def bwd(*rest):
        statics, (arrays, cotangent) = rest[: len(static)], rest[len(static):]
        arrays = (after(arrays[0], jax.tree_util.tree_leaves(cotangent)[0]),) + arrays[1:]
        _, vjp = jax.vjp(lambda *xs: fn(*merge(statics, xs)), *arrays)
        return vjp(cotangent)

    wrapped.defvjp(fwd, bwd)
    return wrapped
