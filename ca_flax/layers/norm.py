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
statistics. :func:`batch_norm_train` (statistics, normalization and an optional fused
``activation`` in one op) has a hand-written backward pass that recomputes what it
needs from them once the output's cotangent arrives (tied to it with
``layers/recompute.after``), in two passes over the map: the per-channel sums, then the
input gradient. Plain autodiff would keep the centred input, the normalized output and
the activation's input: three more feature maps per layer, about half of MobileNetV2's
training memory. Being one op with its own backward also keeps the traced program
small, which is most of what a train step costs to compile from the persistent cache.

On a single CPU device in float32, channels last, with ReLU6 or no activation, native
kernels (``native/batch_norm_train.cc``) compute the batch statistics (two reads of the
map, nothing written; XLA:CPU writes the centred map for the variance) and the whole
backward pass (two reads of the input and the output gradient, recomputing ReLU6's mask,
one write; XLA:CPU writes the masked gradient for its sums). The normalization stays
XLA's, so XLA can still recompute it for the layers that read it instead of keeping it.
``ca_flax.fast_paths.disabled()`` or ``CA_FLAX_NATIVE=0`` takes the XLA formulation,
whose values are the same up to rounding.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax
from jax.custom_derivatives import SymbolicZero

from ca_flax import native
from ca_flax.layers.activations import get_activation, relu6
from ca_flax.layers.params import shaped_param
from ca_flax.layers.recompute import after, recompute_in_backward


# The math below is written in lax primitives: each jnp operator is a small jitted
# function, and their tracing overhead was a large part of the train step's trace time.


def _const(value: float, like: jax.Array) -> np.ndarray:
    """A scalar in ``like``'s dtype (lax takes no Python scalar against float32 under x64)."""
    return np.asarray(value, like.dtype)


def _per_channel(v: jax.Array, like: jax.Array, axis: int) -> jax.Array:
    """The per-channel vector ``v`` broadcast to ``like``'s shape along ``axis``."""
    return lax.broadcast_in_dim(v, like.shape, (axis,))


def _moments_math(x, axis):
    """Mean and biased variance over every axis but ``axis``, in float32 or wider."""
    xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = _reduce_axes(x, axis)
    count = x.size // x.shape[axis]
    mean = lax.div(lax.reduce_sum(xs, axes), _const(count, xs))
    centred = lax.sub(xs, _per_channel(mean, xs, axis))
    var = lax.div(lax.reduce_sum(lax.mul(centred, centred), axes), _const(count, xs))
    return mean, var


def _rstd_and_mul(var, scale, epsilon):
    """``1 / sqrt(var + eps)`` and its product with ``scale``, in ``var``'s dtype."""
    rstd = lax.rsqrt(lax.add(var, _const(epsilon, var)))
    return rstd, lax.mul(rstd, scale.astype(var.dtype))


def _affine(x, mean, var, scale, bias, axis, epsilon):
    """``(x - mean) * (rsqrt(var + eps) * scale) + bias`` in the statistics' dtype, with
    the parts the backward pass reuses: ``(pre_activation, centred, mul, rstd)``. One
    expression for both passes, so the activation's gradient is taken at exactly the
    forward pass's values (ReLU6's kinks included)."""
    stat_dtype = mean.dtype
    rstd, mul = _rstd_and_mul(var, scale, epsilon)
    mul = _per_channel(mul, x, axis)
    centred = lax.sub(x.astype(stat_dtype), _per_channel(mean, x, axis))
    pre = lax.add(lax.mul(centred, mul), _per_channel(bias.astype(stat_dtype), x, axis))
    return pre, centred, mul, rstd


def _normalize_math(x, mean, var, scale, bias, axis, epsilon, dtype, activation):
    """``activation((x - mean) / sqrt(var + eps) * scale + bias)``."""
    y = _affine(x, mean, var, scale, bias, axis, epsilon)[0].astype(dtype)
    return activation(y) if activation is not None else y


# Under autodiff the intermediates are recomputed in the backward pass, not stored.
_normalize = recompute_in_backward(_normalize_math, static_argnums=(5, 6, 7, 8))


def _reduce_axes(x: jax.Array, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(x.ndim) if i != axis)


def _bn_train_math(x, scale, bias, axis, epsilon, dtype, activation):
    mean, var = _moments_math(x, axis)
    return _normalize_math(x, mean, var, scale, bias, axis, epsilon, dtype, activation), mean, var


def _bn_backward_math(x, dy, mean, var, scale, bias, axis, epsilon, dtype, activation):
    """``(dx, d_scale, d_bias)`` through the normalized output, in XLA."""
    reduce_axes = _reduce_axes(x, axis)
    stat_dtype, count = mean.dtype, _const(x.size // mean.size, mean)
    x_stored = x
    x = after(x, dy)  # nothing below may start before the backward pass reaches this layer
    pre, centred, mul, rstd = _affine(x, mean, var, scale, bias, axis, epsilon)
    if activation is None:
        g = dy.astype(stat_dtype)
    else:  # the activation's gradient at its input, as the forward pass computed it
        g = jax.vjp(lambda p: activation(p.astype(dtype)), pre)[1](dy)[0]
    # sum(g * (x - mean)) as sum(g * x) - mean * sum(g): the product of two stored maps
    # is one library reduction on CPU, where the centred map would be written out first.
    sum_g = lax.reduce_sum(g, reduce_axes)
    sum_gx = lax.reduce_sum(lax.mul(g, x_stored.astype(stat_dtype)), reduce_axes)
    sum_g_centred = lax.sub(sum_gx, lax.mul(mean, sum_g))
    # d/dx of (x - mean) * rstd through x, mean and var (the var path is the rstd**2 term).
    var_term = _per_channel(lax.div(lax.mul(lax.mul(rstd, rstd), sum_g_centred), count), x, axis)
    correction = lax.add(_per_channel(lax.div(sum_g, count), x, axis), lax.mul(centred, var_term))
    dx = lax.mul(lax.sub(g, correction), mul)
    return dx, lax.mul(sum_g_centred, rstd), sum_g


# -- the native kernels (CPU, float32, channels last, ReLU6 or no activation) ---------
# Each is differentiable again through the XLA math of the same values (second-order
# derivatives), as the native depthwise kernel gradient is.


def _native_relu6(x: jax.Array, scale: jax.Array, bias: jax.Array, axis: int, dtype: Any,
                  activation: Callable[[jax.Array], jax.Array] | None) -> bool | None:
    """Whether the native kernels take this layer: True with ReLU6, False with no
    activation, None where they do not (another activation, dtype, axis or backend, or
    several devices)."""
    if activation is relu6:
        relu6_on = True
    elif activation is None or activation is get_activation(None):
        relu6_on = False
    else:
        return None
    if axis != x.ndim - 1 or x.size == 0 or jnp.dtype(dtype) != jnp.float32:
        return None
    if any(a.dtype != jnp.float32 for a in (x, scale, bias)) or jax.default_backend() != "cpu":
        return None
    # The custom calls have no partitioning rule: over several devices XLA would gather
    # every map to each of them, where its own reductions partition.
    if jax.device_count() > 1:
        return None
    if native.batch_norm_train_target("statistics") is None or native.batch_norm_train_target("backward") is None:
        return None
    return relu6_on


def _activation(relu6_on: bool) -> Callable[[jax.Array], jax.Array] | None:
    return relu6 if relu6_on else None


# The statistics only: the normalization stays an XLA elementwise op, which XLA fuses
# into its readers and recomputes in the backward pass where they need it (a custom
# call's output would be kept from the forward pass: 0.7 GB more for a MobileNetV2 step).
_native_moments = recompute_in_backward(lambda x: _moments_math(x, x.ndim - 1),
                                        forward=native.batch_norm_train_statistics)


def _native_backward_call(x, dy, mean, var, scale, bias, epsilon, relu6_on):
    # rstd and mul by the forward pass's own XLA code, so ReLU6's mask is recomputed
    # from the same per-channel numbers
    return native.batch_norm_train_backward(x, dy, mean, *_rstd_and_mul(var, scale, epsilon), bias, relu6_on)


_native_backward = recompute_in_backward(
    lambda x, dy, mean, var, scale, bias, epsilon, relu6_on: _bn_backward_math(
        x, dy, mean, var, scale, bias, x.ndim - 1, epsilon, jnp.float32, _activation(relu6_on)),
    static_argnums=(6, 7), forward=_native_backward_call,
)


def _bn_train(x, scale, bias, axis, epsilon, dtype, activation):
    relu6_on = _native_relu6(x, scale, bias, axis, dtype, activation)
    if relu6_on is not None:
        mean, var = _native_moments(x)
        return _normalize_math(x, mean, var, scale, bias, axis, epsilon, dtype, activation), mean, var
    return _bn_train_math(x, scale, bias, axis, epsilon, dtype, activation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, axis: int, epsilon: float, dtype: Any,
    activation: Callable[[jax.Array], jax.Array] | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """BatchNorm with batch statistics: ``(activation(normalized x), mean, var)``.

    Mean and biased variance over every axis but ``axis`` (non-negative), in float32 or
    wider and in two passes as PyTorch (``E[(x - mean)^2]`` keeps digits that
    ``E[x^2] - mean^2`` loses); the output is ``dtype``. The
    backward pass keeps only ``x``, the statistics and the parameters (see the module
    docstring); cotangents of ``mean`` and ``var`` are honoured, and skipped when absent.
    On a single CPU device in float32, channels last, with ReLU6 or no activation, the
    statistics and the backward pass are native kernels (``ca_flax.native``) that compute
    the same values in fewer passes over the map.
    """
    return _bn_train(x, scale, bias, axis, epsilon, dtype, activation)


def _bn_train_fwd(x, scale, bias, axis, epsilon, dtype, activation):
    x, scale, bias = x.value, scale.value, bias.value  # symbolic_zeros=True wraps the primals
    out = _bn_train(x, scale, bias, axis, epsilon, dtype, activation)
    return out, (x, out[1], out[2], scale, bias)


def _bn_train_bwd(axis, epsilon, dtype, activation, residuals, cotangents):
    x, mean, var, scale, bias = residuals
    dy, d_mean, d_var = cotangents
    if isinstance(dy, SymbolicZero):
        dy = jnp.zeros(x.shape, dtype)
    relu6_on = _native_relu6(x, scale, bias, axis, dtype, activation)
    if relu6_on is not None and dy.dtype == jnp.float32:
        dx, d_scale, d_bias = _native_backward(x, dy, mean, var, scale, bias, epsilon, relu6_on)
    else:
        dx, d_scale, d_bias = _bn_backward_math(x, dy, mean, var, scale, bias, axis, epsilon, dtype, activation)
    count = _const(x.size // mean.size, mean)
    if not isinstance(d_mean, SymbolicZero):
        dx = lax.add(dx, _per_channel(lax.div(d_mean, count), x, axis))
    if not isinstance(d_var, SymbolicZero):
        centred = lax.sub(x.astype(mean.dtype), _per_channel(mean, x, axis))
        dx = lax.add(dx, lax.mul(centred, _per_channel(lax.div(lax.mul(d_var, _const(2, d_var)), count), x, axis)))
    return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


batch_norm_train.defvjp(_bn_train_fwd, _bn_train_bwd, symbolic_zeros=True)


def _running_average(average: jax.Array, value: jax.Array, momentum: float) -> jax.Array:
    return lax.add(lax.mul(average, _const(momentum, average)),
                   lax.mul(value.astype(average.dtype), _const(1 - momentum, average)))


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
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)

        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = shaped_param(self, "scale", self.scale_init, (features,), self.param_dtype)
        bias = shaped_param(self, "bias", self.bias_init, (features,), self.param_dtype)

        dtype = jnp.dtype(self.dtype or x.dtype)
        if use_running_average:
            mean, var = ra_mean.value.astype(stat_dtype), ra_var.value.astype(stat_dtype)
            return _normalize(x, mean, var, scale, bias, axis, self.epsilon, dtype, self.activation)
        y, mean, var = batch_norm_train(x, scale, bias, axis, self.epsilon, dtype, self.activation)
        if not self.is_initializing():
            count = x.size // features
            running_var = lax.mul(var, _const(count / max(count - 1, 1), var)) if self.unbiased_running_var else var
            ra_mean.value = _running_average(ra_mean.value, mean, self.momentum)
            ra_var.value = _running_average(ra_var.value, running_var, self.momentum)
        return y

    def eval_affine(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The inference normalization as ``(x - mean) * mul + bias`` per channel:
        ``(mean, mul, bias)`` in float32, from the running statistics and the parameters
        (which must exist: call it on an initialized model). The same values and order of
        operations as ``__call__(x, use_running_average=True)`` before its activation."""
        mean, var = self.get_variable("batch_stats", "mean"), self.get_variable("batch_stats", "var")
        scale, bias = self.get_variable("params", "scale"), self.get_variable("params", "bias")
        if mean is None or scale is None:
            raise ValueError("BatchNorm.eval_affine needs the layer's variables: initialize the model first.")
        stat_dtype = jnp.promote_types(mean.dtype, jnp.float32)
        _, mul = _rstd_and_mul(var.astype(stat_dtype), scale, self.epsilon)
        return mean.astype(stat_dtype), mul, bias.astype(stat_dtype)
