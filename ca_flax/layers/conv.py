"""Convolutions with PyTorch-style padding: 1x1 convolutions as matmuls, dense k x k
convolutions as one matmul over patches where that is faster."""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
from flax import linen as nn

from ca_flax import fast_paths
from ca_flax.layers.depthwise import pad_spatial
from ca_flax.layers.params import shaped_param

# The released code's init: N(0, sqrt(2 / (k * k * out_channels))), i.e. He-normal over
# fan-out. jax's 'normal' distribution is untruncated, as torch's normal_.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# Linear layers: N(0, 0.01), bias 0.
dense_kernel_init = nn.initializers.normal(stddev=0.01)


def symmetric_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch's ``padding=k // 2`` on both sides. Flax's 'SAME' pads (0, 1) at stride 2
    on even inputs, which shifts every window by one pixel relative to PyTorch."""
    if kernel_size % 2 != 1:
        raise ValueError(f"Symmetric padding needs an odd kernel size, got {kernel_size}.")
    p = kernel_size // 2
    return ((p, p), (p, p))


def _last_axis_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def pointwise_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` over the last axis of ``x`` (any rank), with a backward pass that
    computes the weight gradient as one plain 2-D matmul.

    Autodiff would contract the input and the output gradient over every leading axis
    at once (``(N, H, W)``); XLA:CPU then transposes one of the two feature maps before
    its matmul, which cost as much as the matmuls themselves in MobileNetV2's backward
    pass. Flattened to ``(N*H*W, C)``, the contraction needs no copy.
    """
    return _last_axis_matmul(x, w)


def _pointwise_fwd(x, w):
    return _last_axis_matmul(x, w), (x, w)


def _pointwise_bwd(residuals, dy):
    x, w = residuals
    dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
    dw = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ())))
    return dx.astype(x.dtype), dw.astype(w.dtype)


pointwise_matmul.defvjp(_pointwise_fwd, _pointwise_bwd)


class PointwiseConv(nn.Module):
    """1x1 convolution computed as a matmul over the last axis.

    Accepts any rank (NHWC maps, or N x L x C sequences such as the CA block's pooled
    strips). The kernel keeps ``nn.Conv``'s ``(1, 1, in, out)`` layout so checkpoints match
    a 1x1 ``nn.Conv``; XLA's CPU convolution is several times slower than the dot for 1x1.
    """

    features: int
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., jax.Array] = conv_kernel_init
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = shaped_param(self, "kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), self.param_dtype)
        bias = shaped_param(self, "bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = pointwise_matmul(x, kernel[0, 0])
        return y + bias if bias is not None else y


FullConvImpl = Literal["auto", "xla", "patches"]
FULL_CONV_IMPLEMENTATIONS: tuple[str, ...] = ("xla", "patches")


def resolve_full_conv_impl(impl: str, kernel_shape: tuple[int, ...], backend: str | None = None) -> str:
    """Concrete implementation of a dense convolution with an HWIO ``kernel_shape``.

    ``'auto'`` picks ``'patches'`` on CPU when a patch row (``k * k * in``) is at most
    twice as wide as the output (``out``), ``'xla'`` otherwise and on accelerators, which
    keep their convolution units: XLA:CPU convolves a narrow stem several times slower
    than the patch matmul, and a wide window with one output (CBAM's spatial gate)
    faster (docs/performance.md). Inside ``ca_flax.fast_paths.disabled()`` every name
    maps to ``'xla'``.
    """
    if impl != "auto" and impl not in FULL_CONV_IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown convolution implementation {impl!r}; choose one of {('auto',) + FULL_CONV_IMPLEMENTATIONS}."
        )
    if not fast_paths.enabled():
        return "xla"
    if impl == "auto":
        kh, kw, in_channels, out_channels = kernel_shape
        narrow = kh * kw * in_channels <= 2 * out_channels
        return "patches" if (backend or jax.default_backend()) == "cpu" and narrow else "xla"
    return impl


def extract_patches(x: jax.Array, kernel_size: int, stride: int) -> jax.Array:
    """The ``k x k`` windows of NHWC ``x`` (padded ``k // 2`` on every side) at ``stride``,
    flattened to ``(N, H_out, W_out, k * k * C)`` in ``(kh, kw, c)`` order, the order of
    an HWIO kernel reshaped to ``(k * k * C, out)``."""
    n, h, w, c = x.shape
    (pad_h, _), (pad_w, _) = symmetric_padding(kernel_size)
    out_h = (h + 2 * pad_h - kernel_size) // stride + 1
    out_w = (w + 2 * pad_w - kernel_size) // stride + 1
    padded = pad_spatial(x, pad_h, pad_h, pad_w, pad_w)
    windows = [
        jax.lax.slice(
            padded, (0, i, j, 0), (n, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, c), (1, stride, stride, 1)
        )
        for i in range(kernel_size)
        for j in range(kernel_size)
    ]
    return jnp.concatenate(windows, axis=-1)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, impl: FullConvImpl = "auto") -> jax.Array:
    """Dense convolution of NHWC ``x`` with a square HWIO ``kernel``, padding ``k // 2`` on
    every side (PyTorch's ``Conv2d(padding=k // 2)``), no bias.

    ``impl='patches'`` computes it as one matmul of the flattened windows with the
    reshaped kernel (gradients through :func:`pointwise_matmul`); ``'xla'`` calls
    ``lax.conv_general_dilated``; ``'auto'``: see :func:`resolve_full_conv_impl`. All
    give the same values to float rounding.
    """
    kh, kw, in_channels, _ = kernel.shape
    if x.ndim != 4 or kh != kw or in_channels != x.shape[-1]:
        raise ValueError(
            f"conv2d expects NHWC input and a square (k, k, in, out) kernel with in == input channels; "
            f"got input {x.shape} and kernel {kernel.shape}."
        )
    if resolve_full_conv_impl(impl, kernel.shape) == "xla":
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), symmetric_padding(kh), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    return pointwise_matmul(extract_patches(x, kh, stride), kernel.reshape(kh * kw * in_channels, -1))


class Conv(nn.Module):
    """Dense ``kernel_size x kernel_size`` convolution, no bias, symmetric padding.

    Its parameter ``kernel`` has ``nn.Conv``'s ``(k, k, in, out)`` layout whatever ``impl``
    computes it, so checkpoints do not depend on the choice (see :func:`conv2d`).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    impl: FullConvImpl = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., jax.Array] = conv_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"Conv expects NHWC input of rank 4, got shape {x.shape}.")
        kernel = shaped_param(
            self, "kernel", self.kernel_init, (self.kernel_size, self.kernel_size, x.shape[-1], self.features), self.param_dtype
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return conv2d(x, kernel, self.stride, self.impl)
