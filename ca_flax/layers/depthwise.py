"""Depthwise convolution with selectable implementations.

XLA lowers a grouped convolution with ``feature_group_count == channels`` to a slow
generic kernel on CPU (several times slower than the same arithmetic written as
shifted multiply-adds; docs/performance.md) and its backward pass is slow on GPU too (jax issue 13800). This module
keeps one parameter layout, ``(kH, kW, 1, C)`` exactly as ``flax.linen.Conv`` with
``feature_group_count=C`` stores it, and lets the caller choose how it is computed:

- ``'xla'``: ``lax.conv_general_dilated`` with ``feature_group_count=C``.
- ``'shift'``: the kernel as ``kH * kW`` shifted, strided slices of the padded input,
  each scaled by one tap, summed; gradients by autodiff.
- ``'shift_vjp'``: the same forward with a hand-written backward pass: the input
  gradient is again a shifted-taps correlation (for stride 2 split into its four
  polyphase components, so no multiply touches an inserted zero), the kernel gradient
  one reduction per tap.
- ``'auto'``: the fastest for the backend the computation runs on (:func:`resolve_impl`).

Padding is symmetric, ``kernel_size // 2`` on every side, as PyTorch's
``Conv2d(padding=k // 2)`` does; Flax's ``'SAME'`` pads asymmetrically at stride 2.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from ca_flax import fast_paths, native
from ca_flax.layers.params import shaped_param
from ca_flax.layers.recompute import after

DepthwiseImpl = Literal["auto", "xla", "shift", "shift_vjp"]
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "shift", "shift_vjp")

# Fastest implementation per backend, measured in the whole model (docs/performance.md).
# CPU: shifted taps. GPU: XLA's grouped convolution (cuDNN). TPUs have a native
# depthwise unit.
_AUTO_BY_BACKEND = {"cpu": "shift_vjp", "gpu": "xla", "cuda": "xla", "rocm": "xla", "tpu": "xla"}


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """Returns the concrete implementation name for ``impl`` on ``backend``.

    ``'auto'`` maps to the fastest implementation measured for the backend (default:
    ``jax.default_backend()``); other names are validated and returned unchanged. Inside
    ``ca_flax.fast_paths.disabled()`` every name maps to ``'xla'``, one convolution.
    """
    if impl != "auto" and impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown depthwise implementation {impl!r}; choose one of "
            f"{('auto',) + IMPLEMENTATIONS}."
        )
    if not fast_paths.enabled():
        return "xla"
    if impl == "auto":
        return _AUTO_BY_BACKEND.get(backend or jax.default_backend(), "xla")
    return impl


def pad_spatial(x: jax.Array, top: int, bottom: int, left: int, right: int) -> jax.Array:
    """Zero-pads the H and W axes of NHWC ``x``: one ``lax.pad``, where ``jnp.pad``
    traces a nested jitted function per call."""
    zero = jnp.zeros((), x.dtype)
    return lax.pad(x, zero, ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))


def _check_args(x: jax.Array, kernel: jax.Array, stride: int) -> None:
    if x.ndim != 4:
        raise ValueError(f"Depthwise convolution expects NHWC input of rank 4, got shape {x.shape}.")
    kh, kw, one, channels = kernel.shape
    if one != 1 or channels != x.shape[-1]:
        raise ValueError(
            f"Depthwise kernel must have shape (kH, kW, 1, C) with C = {x.shape[-1]} input "
            f"channels, got {kernel.shape}."
        )
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"Depthwise kernel size must be odd for symmetric padding, got {(kh, kw)}.")
    if stride < 1:
        raise ValueError(f"Stride must be a positive integer, got {stride}.")


def _out_size(size: int, k: int, stride: int) -> int:
    return (size + 2 * (k // 2) - k) // stride + 1


def depthwise_conv_xla(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """XLA's grouped convolution: the reference every other implementation must equal."""
    kh, kw = kernel.shape[:2]
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def _shifted_taps(padded: jax.Array, kernel: jax.Array, stride: int, out_h: int, out_w: int) -> jax.Array:
    """Sum over taps (a, b) of ``padded[:, a::stride, b::stride] * kernel[a, b]``.

    ``padded`` is the input already padded; the slices start at each tap's offset and
    take ``out_h x out_w`` positions with the given stride.
    """
    kh, kw = kernel.shape[:2]
    out = None
    for a in range(kh):
        for b in range(kw):
            window = lax.slice(
                padded,
                (0, a, b, 0),
                (padded.shape[0], a + stride * (out_h - 1) + 1, b + stride * (out_w - 1) + 1, padded.shape[3]),
                (1, stride, stride, 1),
            )
            term = lax.mul(window, _tap(kernel, a, b, window))
            out = term if out is None else lax.add(out, term)
    return out


def _tap(kernel: jax.Array, a: int, b: int, like: jax.Array) -> jax.Array:
    """Kernel tap ``(a, b)`` broadcast over the channels of ``like``, in lax primitives
    (jnp indexing and operators trace a jitted function per call: hundreds per model)."""
    taps = lax.slice(kernel, (a, b, 0, 0), (a + 1, b + 1, 1, kernel.shape[3]))
    return lax.broadcast_in_dim(taps.reshape(kernel.shape[3]), like.shape, (like.ndim - 1,))


def depthwise_conv_shift(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise convolution as shifted multiply-adds; gradients by autodiff."""
    kh, kw = kernel.shape[:2]
    out_h, out_w = _out_size(x.shape[1], kh, stride), _out_size(x.shape[2], kw, stride)
    padded = pad_spatial(x, kh // 2, kh // 2, kw // 2, kw // 2)
    return _shifted_taps(padded, kernel.astype(x.dtype), stride, out_h, out_w)


def _input_grad_stride1(dy: jax.Array, kernel: jax.Array) -> jax.Array:
    """d(loss)/dx for stride 1: a correlation of the padded output gradient with the
    kernel flipped in both spatial axes, again as shifted taps."""
    kh, kw = kernel.shape[:2]
    padded = pad_spatial(dy, kh // 2, kh // 2, kw // 2, kw // 2)
    return _shifted_taps(padded, lax.rev(kernel, (0, 1)), 1, dy.shape[1], dy.shape[2])


def _input_grad_strided(dy: jax.Array, kernel: jax.Array, stride: int, in_h: int, in_w: int) -> jax.Array:
    """d(loss)/dx for stride > 1, one polyphase component at a time.

    Padded input row ``u = stride * i + a`` receives ``dy[i] * k[a]``. Rows of one
    residue ``r = u mod stride`` only see taps ``a = r, r + stride, ...``, so each
    component is a small stride-1 sum over the output gradient; the components are
    then interleaved and the padding is cropped off.
    """
    kh, kw = kernel.shape[:2]
    n, out_h, out_w, c = dy.shape
    ph, pw = kh // 2, kw // 2
    # Padded-input extent rounded up to whole phase periods.
    rows = -(-(in_h + 2 * ph) // stride)
    cols = -(-(in_w + 2 * pw) // stride)
    # Output-gradient index i contributes to phase row m = i + a // stride: pad dy so
    # every shifted read stays in bounds.
    max_shift_h, max_shift_w = (kh - 1) // stride, (kw - 1) // stride
    dy_padded = pad_spatial(dy, max_shift_h, max(0, rows - out_h), max_shift_w, max(0, cols - out_w))
    phases = []
    for r in range(stride):
        row_phases = []
        for s in range(stride):
            acc = None
            for a in range(r, kh, stride):
                for b in range(s, kw, stride):
                    sh, sw = max_shift_h - a // stride, max_shift_w - b // stride
                    window = lax.slice(dy_padded, (0, sh, sw, 0), (n, sh + rows, sw + cols, c))
                    term = lax.mul(window, _tap(kernel, a, b, window))
                    acc = term if acc is None else lax.add(acc, term)
            row_phases.append(acc if acc is not None else jnp.zeros((n, rows, cols, c), dy.dtype))
        phases.append(jnp.stack(row_phases, axis=3))  # (n, rows, cols, stride_w, c)
    grid = jnp.stack(phases, axis=2)  # (n, rows, stride_h, cols, stride_w, c)
    full = grid.reshape(n, rows * stride, cols * stride, c)
    return full[:, ph : ph + in_h, pw : pw + in_w]


def _input_grad(dy: jax.Array, kernel: jax.Array, stride: int, in_h: int, in_w: int) -> jax.Array:
    """d(loss)/dx of the convolution with ``kernel``, for an input of ``in_h x in_w``."""
    if stride == 1:
        return _input_grad_stride1(dy, kernel)
    return _input_grad_strided(dy, kernel, stride, in_h, in_w)


def _use_native_kernel_grad(x: jax.Array, dy: jax.Array) -> bool:
    """The C++ kernel (``ca_flax.native``) on CPU in float32, where it builds: one sweep
    instead of the loop below, several times faster, same float32 error."""
    return (x.dtype == jnp.float32 and dy.dtype == jnp.float32 and jax.default_backend() == "cpu"
            and native.depthwise_kernel_grad_target() is not None)


def _kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...], stride: int) -> jax.Array:
    """d(loss)/d(kernel)[a, b, 0, c] = sum over n, i, j of x_padded[window(a, b)] * dy.

    On CPU in float32 one sweep of the native kernel. Otherwise one tap per iteration
    of a loop: each tap's product is a full feature map that XLA:CPU hands to a library
    reduction, and unrolled it would schedule all nine products at once (gigabytes more
    peak memory for a full-size network; docs/performance.md).
    """
    kh, kw = kernel_shape[:2]
    # Tied to dy, so x is (re)computed when the backward pass reaches this layer: the
    # loop's padded copy and phase planes are not hoisted into the forward pass, and the
    # native kernel's operand is rebuilt from what the previous layer stores (x is
    # usually a BatchNorm + ReLU6 output) instead of kept from the forward pass, which
    # held one more feature map per layer.
    x = after(x, dy)
    if _use_native_kernel_grad(x, dy):
        return _native_kernel_grad(x, dy, (kh, kw), stride)
    n, out_h, out_w, c = dy.shape
    # Phase planes: plane (r, s) = padded[:, r::stride, s::stride]; tap (a, b) is the
    # plane (a % stride, b % stride) shifted by (a // stride, b // stride), a plain
    # dynamic slice inside the loop. The extra bottom/right zeros only round the planes
    # up to whole periods; no tap reads them.
    rows, cols = out_h + (kh - 1) // stride, out_w + (kw - 1) // stride
    extra_h = max(0, stride * rows - (x.shape[1] + 2 * (kh // 2)))
    extra_w = max(0, stride * cols - (x.shape[2] + 2 * (kw // 2)))
    padded = pad_spatial(x, kh // 2, kh // 2 + extra_h, kw // 2, kw // 2 + extra_w)
    planes = jnp.stack([
        lax.slice(padded, (0, r, s, 0), (n, r + stride * (rows - 1) + 1, s + stride * (cols - 1) + 1, c),
                  (1, stride, stride, 1))
        for r in range(stride) for s in range(stride)
    ])
    # Accumulate in float32 at least: bf16 sums over a batch lose digits.
    acc_dtype = jnp.promote_types(dy.dtype, jnp.float32)
    dy_acc = dy.astype(acc_dtype)

    # Per tap: (plane, row shift, column shift), worked out here in Python so the loop
    # body traces no integer arithmetic.
    taps = np.array([((a % stride) * stride + b % stride, a // stride, b // stride)
                     for a in range(kh) for b in range(kw)], np.int32)

    def tap(where):
        plane = lax.dynamic_index_in_dim(planes, where[0], keepdims=False)
        zero = jnp.zeros((), where.dtype)  # same index dtype as the shifts, with or without x64
        window = lax.dynamic_slice(plane, (zero, where[1], where[2], zero), (n, out_h, out_w, c))
        return jnp.sum(window.astype(acc_dtype) * dy_acc, axis=(0, 1, 2))

    return lax.map(tap, jnp.asarray(taps)).reshape(kh, kw, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _native_kernel_grad(x: jax.Array, dy: jax.Array, kernel_hw: tuple[int, int], stride: int) -> jax.Array:
    """The native kernel gradient, differentiable again (second-order derivatives, e.g.
    gradient penalties): it is bilinear in ``x`` and ``dy``, so its VJP is the
    convolution's own input gradient and forward pass with the cotangent as kernel."""
    return native.depthwise_kernel_grad(x, dy, kernel_hw, stride)


def _native_kernel_grad_fwd(x, dy, kernel_hw, stride):
    return _native_kernel_grad(x, dy, kernel_hw, stride), (x, dy)


def _native_kernel_grad_bwd(kernel_hw, stride, residuals, cotangent):
    x, dy = residuals
    return _input_grad(dy, cotangent, stride, x.shape[1], x.shape[2]), depthwise_conv_shift(x, cotangent, stride)


_native_kernel_grad.defvjp(_native_kernel_grad_fwd, _native_kernel_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv_shift_vjp(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise convolution as shifted multiply-adds with a hand-written backward pass."""
    return depthwise_conv_shift(x, kernel, stride)


def _shift_vjp_fwd(x, kernel, stride):
    return depthwise_conv_shift(x, kernel, stride), (x, kernel)


def _shift_vjp_bwd(stride, residuals, dy):
    x, kernel = residuals
    dx = _input_grad(dy, kernel.astype(dy.dtype), stride, x.shape[1], x.shape[2])
    dkernel = _kernel_grad(x, dy, kernel.shape, stride)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


depthwise_conv_shift_vjp.defvjp(_shift_vjp_fwd, _shift_vjp_bwd)

_IMPL_FUNCTIONS: dict[str, Callable[[jax.Array, jax.Array, int], jax.Array]] = {
    "xla": depthwise_conv_xla,
    "shift": depthwise_conv_shift,
    "shift_vjp": depthwise_conv_shift_vjp,
}


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1, impl: DepthwiseImpl = "auto") -> jax.Array:
    """Depthwise convolution of NHWC ``x`` with an ``(kH, kW, 1, C)`` kernel.

    Pads ``k // 2`` on every side (PyTorch style) and returns
    ``(N, (H - 1) // stride + 1, (W - 1) // stride + 1, C)`` for odd kernels.
    All implementations give the same values and gradients to float tolerance.
    """
    _check_args(x, kernel, stride)
    return _IMPL_FUNCTIONS[resolve_impl(impl)](x, kernel, stride)


class DepthwiseConv(nn.Module):
    """Depthwise ``kernel_size x kernel_size`` convolution, no bias, symmetric padding.

    Attributes:
      kernel_size: odd spatial size of the kernel (3 in MobileNetV2).
      stride: 1 or 2 (any positive stride works).
      impl: ``'auto'``, ``'xla'``, ``'shift'`` or ``'shift_vjp'``; see module docstring.
        The parameter ``kernel`` has shape ``(k, k, 1, C)`` whatever is chosen, so
        checkpoints do not depend on it.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); ``None`` keeps the input's.
      param_dtype: dtype of the kernel parameter.
      kernel_init: initializer of the kernel.
    """

    kernel_size: int = 3
    stride: int = 1
    impl: DepthwiseImpl = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"DepthwiseConv expects NHWC input of rank 4, got shape {x.shape}.")
        kernel = shaped_param(
            self, "kernel", self.kernel_init, (self.kernel_size, self.kernel_size, 1, x.shape[-1]), self.param_dtype
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return depthwise_conv(x, kernel, self.stride, self.impl)
