"""Average pooling that accumulates in at least float32."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp


def mean_pool(x: jax.Array, axis: int | Sequence[int], keepdims: bool = False, dtype: Any = None) -> jax.Array:
    """Mean of ``x`` over ``axis``, summed in float32 (float64 stays float64) and returned
    in ``dtype`` (default ``x.dtype``): a bfloat16 sum over thousands of positions loses
    most of its digits."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.mean(x, axis=axis, keepdims=keepdims, dtype=acc).astype(dtype or x.dtype)
