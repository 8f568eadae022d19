"""Hand-written CPU kernels for what XLA:CPU does slowly, called through ``jax.ffi``.

Each kernel has an XLA formulation that computes the same values; the callers use the
kernel on CPU for the dtypes it supports and fall back to XLA everywhere else, or when
the kernel cannot be built (see :mod:`ca_flax.native.loader`). ``CA_FLAX_NATIVE=0`` turns
them all off.

- :func:`depthwise_kernel_grad`: the depthwise convolution's kernel gradient in one sweep
  over the input and the output gradient (XLA:CPU: a window copy and a library
  multiply-sum per tap).
- :func:`depthwise_inference`: a MobileNet block's depthwise unit in inference (the
  previous BatchNorm and activation, the depthwise convolution, its BatchNorm and
  activation, and the row and column sums attention blocks pool) in one pass over the
  feature map (XLA:CPU: five). :func:`expand_depthwise_inference` also computes the
  expand 1x1 convolution before it, a few rows at a time in cache, so the block's widest
  map is never written to memory.
- :func:`dense_conv_inference`: a dense convolution with few input channels (the stem),
  its BatchNorm and activation in inference, accumulated in registers per output pixel
  (XLA:CPU: the windows copied out, a matmul, then a normalization pass).
- :func:`batch_norm_train_statistics` and :func:`batch_norm_train_backward`: BatchNorm
  in training (batch statistics, ReLU6 or no activation): the statistics, and the whole
  backward pass, in passes over the map that write nothing but the result (XLA:CPU
  writes the centred map for the variance, and the activation's gradient for the
  backward pass's sums).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ca_flax.native.loader import DISABLE_ENV, NativeBuildError, build, cache_dir, disabled, enabled, ffi_target

__all__ = [
    "DISABLE_ENV", "NativeBuildError", "build", "cache_dir", "disabled", "enabled", "depthwise_kernel_grad",
    "depthwise_kernel_grad_target", "EvalAffine", "depthwise_inference", "depthwise_inference_target",
    "expand_depthwise_inference", "expand_depthwise_inference_target", "dense_conv_inference",
    "dense_conv_inference_target", "batch_norm_train_target",
    "batch_norm_train_statistics", "batch_norm_train_backward",
]


def _float32_target(target: str | None, kernel: str, *arrays: jax.Array) -> str:
    """``target``, after checking that the kernel exists and the operands are float32."""
    if target is None:
        raise RuntimeError(f"The native {kernel} is unavailable (see ca_flax.native.loader).")
    if any(a.dtype != jnp.float32 for a in arrays):
        raise TypeError(f"The native {kernel} takes float32, got {', '.join(str(a.dtype) for a in arrays)}.")
    return target


def depthwise_kernel_grad_target() -> str | None:
    """The FFI target of the depthwise kernel gradient, or None where it is unavailable."""
    return ffi_target("depthwise_kernel_grad", "CaFlaxDepthwiseKernelGrad")


def depthwise_kernel_grad(x: jax.Array, dy: jax.Array, kernel_hw: tuple[int, int], stride: int) -> jax.Array:
    """``d(loss)/d(kernel)`` of a depthwise convolution, shape ``(kH, kW, 1, C)``, float32.

    ``x`` is the NHWC float32 input, ``dy`` the output's gradient; padding is
    ``k // 2`` on every side (PyTorch's). CPU only: the caller checks
    :func:`depthwise_kernel_grad_target` and the dtypes first.
    """
    target = _float32_target(depthwise_kernel_grad_target(), "depthwise kernel gradient", x, dy)
    kh, kw = kernel_hw
    result = jax.ShapeDtypeStruct((kh, kw, 1, x.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(target, result, vmap_method="sequential")(x, dy, stride=np.int64(stride))


class EvalAffine(NamedTuple):
    """An inference BatchNorm as ``(x - mean) * mul + bias`` per channel, with
    ``mul = scale / sqrt(var + eps)`` (float32 vectors of length C)."""

    mean: jax.Array
    mul: jax.Array
    bias: jax.Array


def depthwise_inference_target() -> str | None:
    """The FFI target of the fused depthwise inference unit, or None where it is unavailable."""
    return ffi_target("depthwise_inference", "CaFlaxDepthwiseInference")


def depthwise_inference(
    x: jax.Array, kernel: jax.Array, stride: int, in_affine: EvalAffine | None, in_relu6: bool,
    out_affine: EvalAffine, out_relu6: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A depthwise unit in inference, in one pass: ``(y, row_sum, col_sum)``.

    ``v = act_in(in_affine(x))`` (``v = x`` when ``in_affine`` is None), ``z`` the depthwise
    convolution of ``v`` with the ``(kH, kW, 1, C)`` ``kernel`` at ``stride`` (padding
    ``k // 2``, PyTorch's), ``y = act_out(out_affine(z))``; ``act`` is ReLU6 where the
    flag is set, else the identity. ``row_sum`` (N, OH, C) sums ``y`` over its columns,
    ``col_sum`` (N, OW, C) over its rows. Float32 on CPU only: the caller checks
    :func:`depthwise_inference_target` first.
    """
    target = _float32_target(depthwise_inference_target(), "depthwise inference unit", x, kernel)
    n, h, w, c = x.shape
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    identity = EvalAffine(*(jnp.zeros((c,), jnp.float32),) * 3)  # unused by the kernel
    vectors = [v.astype(jnp.float32) for v in (*(in_affine or identity), *out_affine)]
    results = (jax.ShapeDtypeStruct((n, oh, ow, c), jnp.float32), jax.ShapeDtypeStruct((n, oh, c), jnp.float32),
               jax.ShapeDtypeStruct((n, ow, c), jnp.float32))
    call = jax.ffi.ffi_call(target, results, vmap_method="sequential")
    return call(x, kernel, *vectors, stride=np.int64(stride), in_affine=in_affine is not None,
                in_relu6=bool(in_relu6), out_relu6=bool(out_relu6))


def expand_depthwise_inference_target() -> str | None:
    """The FFI target of the fused expand + depthwise inference unit, or None where it is unavailable."""
    return ffi_target("depthwise_inference", "CaFlaxExpandDepthwiseInference")


def expand_depthwise_inference(
    x: jax.Array, expand: jax.Array, in_affine: EvalAffine, in_relu6: bool, kernel: jax.Array, stride: int,
    out_affine: EvalAffine, out_relu6: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`depthwise_inference` of ``x @ expand`` (a 1x1 convolution's ``(Ci, C)``
    kernel on the NHWC ``x`` of ``Ci`` channels) with ``in_affine`` as its BatchNorm, in one
    pass: the expand output is computed a few rows at a time into the kernel's row buffer
    and never written out. Float32 on CPU only: the caller checks
    :func:`expand_depthwise_inference_target` first."""
    target = _float32_target(expand_depthwise_inference_target(), "expand + depthwise inference unit", x, expand,
                             kernel)
    n, h, w, _ = x.shape
    c = expand.shape[-1]
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    vectors = [v.astype(jnp.float32) for v in (*in_affine, *out_affine)]
    results = (jax.ShapeDtypeStruct((n, oh, ow, c), jnp.float32), jax.ShapeDtypeStruct((n, oh, c), jnp.float32),
               jax.ShapeDtypeStruct((n, ow, c), jnp.float32))
    call = jax.ffi.ffi_call(target, results, vmap_method="sequential")
    return call(x, expand, kernel, *vectors, stride=np.int64(stride), in_relu6=bool(in_relu6),
                out_relu6=bool(out_relu6))


def dense_conv_inference_target() -> str | None:
    """The FFI target of the dense convolution inference unit, or None where it is unavailable."""
    return ffi_target("dense_conv_inference", "CaFlaxDenseConvInference")


def dense_conv_inference(x: jax.Array, kernel: jax.Array, stride: int, affine: EvalAffine, relu6: bool) -> jax.Array:
    """``act(affine(conv(x, kernel)))`` for NHWC float32 ``x`` and an HWIO ``kernel`` of odd
    size at ``stride``, padding ``k // 2`` (PyTorch's); ``act`` is ReLU6 or the identity.
    Meant for few input channels (each output pixel reads ``kH * kW * Ci`` values into
    registers). Float32 on CPU only: the caller checks :func:`dense_conv_inference_target`."""
    target = _float32_target(dense_conv_inference_target(), "dense convolution inference unit", x, kernel)
    n, h, w, _ = x.shape
    result = jax.ShapeDtypeStruct((n, (h - 1) // stride + 1, (w - 1) // stride + 1, kernel.shape[-1]), jnp.float32)
    call = jax.ffi.ffi_call(target, result, vmap_method="sequential")
    return call(x, kernel, *(v.astype(jnp.float32) for v in affine), stride=np.int64(stride), relu6=bool(relu6))


def batch_norm_train_target(kernel: str) -> str | None:
    """The FFI target of a BatchNorm training kernel (``kernel``: ``'statistics'`` or
    ``'backward'``), or None where it is unavailable."""
    symbol = {"statistics": "CaFlaxBatchNormTrainStatistics", "backward": "CaFlaxBatchNormTrainBackward"}[kernel]
    return ffi_target("batch_norm_train", symbol)


def batch_norm_train_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(mean, var)`` over every axis but the last (the channels) of the float32 map
    ``x``: the biased variance about the mean (two passes, summed in double). CPU only:
    the caller checks :func:`batch_norm_train_target` first."""
    target = _float32_target(batch_norm_train_target("statistics"), "BatchNorm training kernel", x)
    vector = jax.ShapeDtypeStruct((x.shape[-1],), jnp.float32)
    return jax.ffi.ffi_call(target, (vector, vector), vmap_method="sequential")(x)


def batch_norm_train_backward(
    x: jax.Array, dy: jax.Array, mean: jax.Array, rstd: jax.Array, mul: jax.Array, bias: jax.Array, relu6: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(dx, d_scale, d_bias)`` of ``y = act((x - mean) * mul + bias)`` with the batch
    statistics of ``x`` (their own dependence on ``x`` included), for the output gradient
    ``dy``; ``rstd = 1 / sqrt(var + eps)`` and ``mul = rstd * scale`` as the forward pass
    computed them, ``act`` ReLU6 where ``relu6`` is set (its gradient passes strictly
    inside (0, 6)), else the identity. CPU only: the caller checks
    :func:`batch_norm_train_target` first."""
    target = _float32_target(batch_norm_train_target("backward"), "BatchNorm training kernel", x, dy, mean, rstd,
                             mul, bias)
    c = x.shape[-1]
    results = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct((c,), jnp.float32),
               jax.ShapeDtypeStruct((c,), jnp.float32))
    call = jax.ffi.ffi_call(target, results, vmap_method="sequential")
    return call(x, dy, mean, rstd, mul, bias, relu6=bool(relu6))
