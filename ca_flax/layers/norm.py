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

Memory in training: the backward pass keeps only the layer's input and its per-channel
statistics. The normalization (and an optional fused ``activation``) is recomputed
from them in the backward pass (``layers/recompute.py``), and the batch variance has a
hand-written gradient that needs no centred copy of the input. Plain autodiff would keep
the centred input, the normalized output and the activation's input: three more
feature maps per layer, about half of MobileNetV2's training memory.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from ca_flax.layers.recompute import after, recompute_in_backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def batch_moments(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance over ``axes`` in float32 or wider, the variance in two
    passes as PyTorch (``E[(x - mean)^2]`` keeps digits that ``E[x^2] - mean^2`` loses).
    The backward pass keeps ``x`` as given (a bfloat16 map stays bfloat16)."""
    xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xs, axis=axes)
    var = jnp.mean(jnp.square(xs - jnp.expand_dims(mean, axes)), axis=axes)
    return mean, var


def _moments_fwd(x, axes):
    mean, var = batch_moments(x, axes)
    return (mean, var), (x, mean)


def _moments_bwd(axes, residuals, cotangents):
    x, mean = residuals
    d_mean, d_var = (jnp.expand_dims(d, axes) for d in cotangents)
    x = after(x, d_var)  # the centred map below waits for the backward pass
    count = x.size // mean.size
    # d var / d x = 2 (x - mean) / count: the path through the mean sums to zero.
    centred = x.astype(mean.dtype) - jnp.expand_dims(mean, axes)
    dx = (d_mean + 2.0 * d_var * centred) / count
    return (dx.astype(x.dtype),)


batch_moments.defvjp(_moments_fwd, _moments_bwd)


def _normalize_math(x, mean, var, scale, bias, axis, epsilon, dtype, activation):
    """``activation((x - mean) / sqrt(var + eps) * scale + bias)``."""
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    stat_dtype = mean.dtype
    mul = (jax.lax.rsqrt(var + epsilon) * scale.astype(stat_dtype)).reshape(shape)
    y = (x.astype(stat_dtype) - mean.reshape(shape)) * mul + bias.astype(stat_dtype).reshape(shape)
    y = y.astype(dtype)
    return activation(y) if activation is not None else y


# Under autodiff the intermediates are recomputed in the backward pass, not stored.
_normalize = recompute_in_backward(_normalize_math, static_argnums=(5, 6, 7, 8))


class BatchNorm(nn.Module):
    """Batch normalization over every axis but ``axis`` (the channel axis).

    Attributes:
      momentum: running-average decay, Flax convention (PyTorch ``momentum=0.1`` is 0.9).
      epsilon: added to the variance (PyTorch's default 1e-5).
      axis: the feature axis, normalized per entry.
      unbiased_running_var: update ``var`` with the unbiased batch variance, as PyTorch.
      dtype: output dtype (``None``: the input's); statistics are always at least float32.
      param_dtype: dtype of ``scale`` and ``bias``.
      activation: applied to the normalized output inside the same recomputed region
        (``None``: none), so the activation's input is not stored for the backward pass.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    axis: int = -1
    unbiased_running_var: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Callable[..., jax.Array] = nn.initializers.ones
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros
    activation: Callable[[jax.Array], jax.Array] | None = None

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
            mean, var = ra_mean.value.astype(stat_dtype), ra_var.value.astype(stat_dtype)
        else:
            mean, var = batch_moments(x, reduce_axes)
            if not self.is_initializing():
                count = x.size // features
                running_var = var * (count / max(count - 1, 1)) if self.unbiased_running_var else var
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean.astype(ra_mean.value.dtype)
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * running_var.astype(ra_var.value.dtype)

        dtype = self.dtype or x.dtype
        return _normalize(x, mean, var, scale, bias, axis, self.epsilon, jnp.dtype(dtype), self.activation)
