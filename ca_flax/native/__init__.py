"""Hand-written CPU kernels for what XLA:CPU does slowly, called through ``jax.ffi``.

Each kernel has an XLA formulation that computes the same values; the callers use the
kernel on CPU for the dtypes it supports and fall back to XLA everywhere else, or when
the kernel cannot be built (see :mod:`ca_flax.native.loader`). ``CA_FLAX_NATIVE=0`` turns
them all off.

- :func:`depthwise_kernel_grad`: the depthwise convolution's kernel gradient in one sweep
  over the input and the output gradient (XLA:CPU: a window copy and a library
  multiply-sum per tap).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ca_flax.native.loader import DISABLE_ENV, NativeBuildError, build, cache_dir, enabled, ffi_target

__all__ = ["DISABLE_ENV", "NativeBuildError", "build", "cache_dir", "enabled", "depthwise_kernel_grad", "depthwise_kernel_grad_target"]


def depthwise_kernel_grad_target() -> str | None:
    """The FFI target of the depthwise kernel gradient, or None where it is unavailable."""
    return ffi_target("depthwise_kernel_grad", "CaFlaxDepthwiseKernelGrad")


def depthwise_kernel_grad(x: jax.Array, dy: jax.Array, kernel_hw: tuple[int, int], stride: int) -> jax.Array:
    """``d(loss)/d(kernel)`` of a depthwise convolution, shape ``(kH, kW, 1, C)``, float32.

    ``x`` is the NHWC float32 input, ``dy`` the output's gradient; padding is
    ``k // 2`` on every side (PyTorch's). CPU only: the caller checks
    :func:`depthwise_kernel_grad_target` and the dtypes first.
    """
    target = depthwise_kernel_grad_target()
    if target is None:
        raise RuntimeError("The native depthwise kernel gradient is unavailable (see ca_flax.native.loader).")
    if x.dtype != jnp.float32 or dy.dtype != jnp.float32:
        raise TypeError(f"The native depthwise kernel gradient takes float32, got {x.dtype} and {dy.dtype}.")
    kh, kw = kernel_hw
    result = jax.ShapeDtypeStruct((kh, kw, 1, x.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(target, result, vmap_method="sequential")(x, dy, stride=np.int64(stride))
