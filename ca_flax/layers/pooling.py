"""Average pooling that accumulates in at least float32, and pools computed upstream."""

from __future__ import annotations

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
    """Sums of an NHWC map ``y`` along each spatial axis, from a producer that computed
    them while writing ``y`` (``layers/fused.py``), so attention blocks need not read ``y``
    again to pool it. Float32 or wider."""

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
