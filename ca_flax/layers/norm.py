"""BatchNorm with PyTorch's semantics.

Same variables as ``flax.linen.BatchNorm`` (params ``scale``/``bias``, batch_stats
``mean``/``var``), so checkpoints and tools that expect Flax's names work. The one
difference is the running-variance update: PyTorch folds in the *unbiased* batch variance
(``n / (n - 1)`` times the biased one used for normalizing); Flax folds in the biased one.
``unbiased_running_var=True`` (the default) follows PyTorch, so a model trained here has the
running statistics the released PyTorch code would have.

Statistics are reduced in float32 (or wider) whatever the computation dtype, and under
``jax.jit`` with a batch sharded over devices the reductions are global: BatchNorm sees
the whole global batch with no ``axis_name`` plumbing.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn


class BatchNorm(nn.Module):
    """Batch normalization over every axis but ``axis`` (the channel axis).

    Attributes:
      momentum: running-average decay, Flax convention (PyTorch ``momentum=0.1`` is 0.9).
      epsilon: added to the variance (PyTorch's default 1e-5).
      axis: the feature axis, normalized per entry.
      unbiased_running_var: update ``var`` with the unbiased batch variance, as PyTorch.
      dtype: output dtype (``None``: the input's); statistics are always at least float32.
      param_dtype: dtype of ``scale`` and ``bias``.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    axis: int = -1
    unbiased_running_var: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Callable[..., jax.Array] = nn.initializers.ones
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        """Normalizes ``x`` with batch statistics (training) or the running ones."""
        axis = self.axis % x.ndim
        features = x.shape[axis]
        reduce_axes: Sequence[int] = tuple(i for i in range(x.ndim) if i != axis)
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)

        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype)

        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            xs = x.astype(stat_dtype)
            mean = jnp.mean(xs, axis=reduce_axes)
            # Two-pass variance, as PyTorch: E[(x - mean)^2] keeps digits that
            # E[x^2] - mean^2 cancels away.
            shape = [1] * x.ndim
            shape[axis] = features
            var = jnp.mean(jnp.square(xs - mean.reshape(shape)), axis=reduce_axes)
            if not self.is_initializing():
                count = x.size // features
                running_var = var * (count / max(count - 1, 1)) if self.unbiased_running_var else var
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean.astype(ra_mean.value.dtype)
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * running_var.astype(ra_var.value.dtype)

        shape = [1] * x.ndim
        shape[axis] = features
        dtype = self.dtype or x.dtype
        mul = (jax.lax.rsqrt(var.astype(stat_dtype) + self.epsilon) * scale.astype(stat_dtype)).reshape(shape)
        y = (x.astype(stat_dtype) - mean.astype(stat_dtype).reshape(shape)) * mul + bias.astype(stat_dtype).reshape(shape)
        return y.astype(dtype)
