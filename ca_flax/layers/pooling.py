"""Average pooling that accumulates in at least float32, and pools a producer computed.

A fused CPU unit (``layers/fused.py``) computes its output's row and column sums while
writing it, and records them with :func:`remember_sums`. The pools below take them from
there when they are asked to pool exactly that output, so an attention block after the
unit need not read the map again; everywhere else they reduce the map. Either way the
block's code is the same: ``pool_rows(x)``, ``pool_cols(x)``, ``pool_global(x)``.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp


def mean_pool(x: jax.Array, axis: int | Sequence[int], keepdims: bool = False, dtype: Any = None) -> jax.Array:
    """Mean of ``x`` over ``axis``, summed in float32 (float64 stays float64) and returned
    in ``dtype`` (default ``x.dtype``): a bfloat16 sum over thousands of positions loses
    most of its digits."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.mean(x, axis=axis, keepdims=keepdims, dtype=acc).astype(dtype or x.dtype)


class DirectionalSums(NamedTuple):
    """Sums of an NHWC map ``y`` along each spatial axis, float32 or wider."""

    rows: jax.Array  # (N, H, C): sum over the columns (W) of each row
    cols: jax.Array  # (N, W, C): sum over the rows (H) of each column

    def row_means(self, dtype: Any) -> jax.Array:
        """``mean_pool(y, axis=2)``: (N, H, C)."""
        return (self.rows / self.cols.shape[1]).astype(dtype)

    def col_means(self, dtype: Any) -> jax.Array:
        """``mean_pool(y, axis=1)``: (N, W, C)."""
        return (self.cols / self.rows.shape[1]).astype(dtype)

    def global_mean(self, dtype: Any) -> jax.Array:
        """``mean_pool(y, axis=(1, 2), keepdims=True)``: (N, 1, 1, C)."""
        height, width = self.rows.shape[1], self.cols.shape[1]
        return (jnp.sum(self.rows, axis=1) / (height * width))[:, None, None, :].astype(dtype)


# Per thread, the last map whose sums a producer recorded: (weak reference to the map,
# its sums). The map is compared by identity, so only that very array (or tracer) is
# pooled from the sums; the entry is dropped with the map (at the end of a trace).
_known = threading.local()


def remember_sums(y: jax.Array, sums: DirectionalSums) -> None:
    """Records that ``sums`` are the row and column sums of the NHWC map ``y``."""
    n, h, w, c = y.shape
    if tuple(sums.rows.shape) != (n, h, c) or tuple(sums.cols.shape) != (n, w, c):
        raise ValueError(
            f"remember_sums: expected row sums {(n, h, c)} and column sums {(n, w, c)} for a map {y.shape}, "
            f"got {tuple(sums.rows.shape)} and {tuple(sums.cols.shape)}."
        )
    store = _known

    def forget(ref: weakref.ref) -> None:
        if getattr(store, "entry", None) is not None and store.entry[0] is ref:
            store.entry = None

    try:
        store.entry = (weakref.ref(y, forget), sums)
    except TypeError:  # an array type without weak references: it is pooled the plain way
        store.entry = None


def known_sums(x: jax.Array) -> DirectionalSums | None:
    """The sums recorded for ``x`` itself by :func:`remember_sums`, or None."""
    entry = getattr(_known, "entry", None)
    if entry is not None and entry[0]() is x:
        return entry[1]
    return None


def pool_rows(x: jax.Array, dtype: Any = None) -> jax.Array:
    """Mean of each row of the NHWC map ``x`` (over W): ``(N, H, C)`` in ``dtype``."""
    sums = known_sums(x)
    return mean_pool(x, axis=2, dtype=dtype) if sums is None else sums.row_means(dtype or x.dtype)


def pool_cols(x: jax.Array, dtype: Any = None) -> jax.Array:
    """Mean of each column of the NHWC map ``x`` (over H): ``(N, W, C)`` in ``dtype``."""
    sums = known_sums(x)
    return mean_pool(x, axis=1, dtype=dtype) if sums is None else sums.col_means(dtype or x.dtype)


def pool_global(x: jax.Array, dtype: Any = None) -> jax.Array:
    """Mean of the NHWC map ``x`` over H and W: ``(N, 1, 1, C)`` in ``dtype``."""
    sums = known_sums(x)
    return mean_pool(x, axis=(1, 2), keepdims=True, dtype=dtype) if sums is None else sums.global_mean(dtype or x.dtype)
