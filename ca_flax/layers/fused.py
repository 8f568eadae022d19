"""Inference fusions of MobileNet units on CPU: a depthwise unit with its producer, and
a stem.

In eval mode an inverted residual computes, after its expand matmul,

    BatchNorm -> ReLU6 -> depthwise conv -> BatchNorm -> ReLU6 -> the attention's pools

and all of it is local: each output pixel needs a 3x3 window of the expand output and
two per-channel affine maps from the running statistics. XLA:CPU runs it as several
passes over the block's widest map; :func:`depthwise_unit_inference` runs it as one
native kernel that writes the unit's output and its row and column sums, which CA and SE
pool. With the expand unit as its producer the kernel computes the expand matmul too, a
few rows at a time into a buffer in cache
(:func:`ca_flax.native.expand_depthwise_inference`), so the expand output, the block's
widest map, is never written to memory; without one
(:func:`ca_flax.native.depthwise_inference`) it reads its input once.

The stem (a 3x3 convolution of the 3-channel image, BatchNorm, ReLU6) is the other
unit XLA:CPU runs poorly at inference: it copies every window out for a matmul, then
normalizes in another pass. :func:`dense_unit_inference` computes it in one native
kernel that keeps each pixel's outputs in registers
(:func:`ca_flax.native.dense_conv_inference`).

``layers/units.ConvBNAct`` asks :func:`fuses_depthwise_unit` and :func:`fuses_dense_unit`
whether it may take these paths: only where they compute what the modules would (same
parameters and operations; float rounding differs in summation order, and BatchNorm is
one multiply-add, as PyTorch's CPU inference computes it), and where the kernel exists.
Everywhere else, with ``CA_FLAX_NATIVE=0`` and inside ``ca_flax.fast_paths.disabled()``,
the modules run as written. The fused units stay differentiable (an eval-mode loss, as
in fine-tuning with frozen BatchNorm, or an input gradient): the backward pass is that
of the same math in XLA (:func:`depthwise_unit_math`, :func:`dense_unit_math`),
recomputed from the unit's inputs. docs/performance.md has the measurements.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from ca_flax import native
from ca_flax.layers.activations import get_activation, relu6
from ca_flax.layers.conv import conv2d, pointwise_matmul
from ca_flax.layers.depthwise import depthwise_conv
from ca_flax.layers.pooling import DirectionalSums
from ca_flax.layers.recompute import recompute_in_backward

if TYPE_CHECKING:  # units.py calls into this module
    from ca_flax.layers.units import ConvBNAct

EvalAffine = native.EvalAffine


def _relu6_flag(activation: Any) -> bool | None:
    """True for ReLU6, False for no activation, None for anything the kernels lack."""
    function = get_activation(activation)
    if function is relu6:
        return True
    return False if function is get_activation(None) else None


def _float32_unit(unit: ConvBNAct) -> bool:
    return unit.dtype in (None, jnp.float32) and jnp.dtype(unit.param_dtype) == jnp.float32


def _may_fuse(unit: ConvBNAct, x: jax.Array, train: bool) -> bool:
    """What every fusion needs: eval mode on an initialized model that records no
    intermediates, float32, an activation the kernels have, the CPU backend."""
    if train or unit.is_initializing() or unit.is_mutable_collection("intermediates"):
        return False
    if x.dtype != jnp.float32 or not _float32_unit(unit) or _relu6_flag(unit.activation) is None:
        return False
    return jax.default_backend() == "cpu"


def _normalize(x: jax.Array, affine: EvalAffine, relu6_on: bool) -> jax.Array:
    y = (x - affine.mean) * affine.mul + affine.bias  # BatchNorm's order of operations
    return relu6(y) if relu6_on else y


# -- depthwise unit ------------------------------------------------------------------


def depthwise_unit_math(
    x: jax.Array, kernel: jax.Array, in_affine: EvalAffine | None, out_affine: EvalAffine, stride: int,
    in_relu6: bool, out_relu6: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What :func:`ca_flax.native.depthwise_inference` computes, in XLA: ``(y, row_sum, col_sum)``."""
    v = x if in_affine is None else _normalize(x, in_affine, in_relu6)
    y = _normalize(depthwise_conv(v, kernel, stride, "auto"), out_affine, out_relu6)
    return y, jnp.sum(y, axis=2), jnp.sum(y, axis=1)


# The native kernel forward; the XLA math, recomputed, differentiated backward.
_depthwise_unit = recompute_in_backward(
    depthwise_unit_math, static_argnums=(4, 5, 6),
    forward=lambda x, kernel, in_affine, out_affine, stride, in_relu6, out_relu6: native.depthwise_inference(
        x, kernel, stride, in_affine, in_relu6, out_affine, out_relu6),
)


def expand_depthwise_unit_math(
    x: jax.Array, expand: jax.Array, in_affine: EvalAffine, in_relu6: bool, kernel: jax.Array, stride: int,
    out_affine: EvalAffine, out_relu6: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What :func:`ca_flax.native.expand_depthwise_inference` computes, in XLA."""
    return depthwise_unit_math(pointwise_matmul(x, expand), kernel, in_affine, out_affine, stride, in_relu6, out_relu6)


_expand_depthwise_unit = recompute_in_backward(
    expand_depthwise_unit_math, static_argnums=(3, 5, 7), forward=native.expand_depthwise_inference,
)


def fuses_depthwise_unit(unit: ConvBNAct, producer: ConvBNAct | None, x: jax.Array, train: bool) -> bool:
    """Whether :func:`depthwise_unit_inference` may replace ``unit(producer(x))``.

    Needs: eval mode on an initialized model that records no intermediates; float32 throughout; the depthwise unit with
    ``depthwise_impl='auto'`` (an explicit implementation is honoured as asked); ReLU6 or
    no activation in both units; the CPU backend and a built kernel.
    """
    if not _may_fuse(unit, x, train) or unit.kind != "depthwise" or unit.depthwise_impl != "auto":
        return False
    if producer is not None and (not _float32_unit(producer) or _relu6_flag(producer.activation) is None):
        return False
    return native.depthwise_inference_target() is not None


def depthwise_unit_inference(
    unit: ConvBNAct, producer: ConvBNAct | None, x: jax.Array
) -> tuple[jax.Array, DirectionalSums]:
    """``unit(producer(x), train=False)`` (``unit(x)`` without a producer) in one native
    kernel, with the output's row and column sums; the producer's convolution runs inside
    it (or, where that kernel is unavailable, as XLA's matmul before it). Check
    :func:`fuses_depthwise_unit` first."""
    kernel = unit.conv.variables["params"]["kernel"].astype(jnp.float32)  # as the vectors: whatever was loaded
    out_affine, out_relu6 = EvalAffine(*unit.bn.eval_affine()), bool(_relu6_flag(unit.activation))
    if producer is None:
        with jax.named_scope("fused_depthwise_unit"):  # a row of its own in benchmarks/profile_step.py
            y, rows, cols = _depthwise_unit(x, kernel, None, out_affine, unit.stride, False, out_relu6)
        return y, DirectionalSums(rows, cols)
    in_affine, in_relu6 = EvalAffine(*producer.bn.eval_affine()), bool(_relu6_flag(producer.activation))
    if native.expand_depthwise_inference_target() is None:
        with jax.named_scope("fused_depthwise_unit"):
            y, rows, cols = _depthwise_unit(producer.convolve(x), kernel, in_affine, out_affine, unit.stride,
                                            in_relu6, out_relu6)
        return y, DirectionalSums(rows, cols)
    expand = producer.conv.variables["params"]["kernel"][0, 0]  # a pointwise kernel: (1, 1, Ci, C)
    with jax.named_scope("fused_expand_depthwise_unit"):
        y, rows, cols = _expand_depthwise_unit(x, expand.astype(jnp.float32), in_affine, in_relu6, kernel,
                                               unit.stride, out_affine, out_relu6)
    return y, DirectionalSums(rows, cols)


# -- dense unit (the stem) -----------------------------------------------------------

# A dense unit is fused when a window (kH * kW * Ci values) is at most this wide: the
# kernel broadcasts every window value against the output channels, which pays off for
# a stem's few input channels; wider windows are a library matmul's job.
MAX_FUSED_WINDOW = 64


def dense_unit_math(x: jax.Array, kernel: jax.Array, affine: EvalAffine, stride: int, relu6_on: bool) -> jax.Array:
    """What :func:`ca_flax.native.dense_conv_inference` computes, in XLA."""
    return _normalize(conv2d(x, kernel, stride), affine, relu6_on)


_dense_unit = recompute_in_backward(
    dense_unit_math, static_argnums=(3, 4),
    forward=lambda x, kernel, affine, stride, relu6_on: native.dense_conv_inference(x, kernel, stride, affine, relu6_on),
)


def fuses_dense_unit(unit: ConvBNAct, x: jax.Array, train: bool) -> bool:
    """Whether :func:`dense_unit_inference` may replace ``unit(x)``: as
    :func:`fuses_depthwise_unit`, for a ``kind='full'`` unit of odd size whose windows
    hold at most ``MAX_FUSED_WINDOW`` values."""
    if not _may_fuse(unit, x, train) or unit.kind != "full" or unit.kernel_size % 2 == 0:
        return False
    if unit.kernel_size**2 * x.shape[-1] > MAX_FUSED_WINDOW:
        return False
    return native.dense_conv_inference_target() is not None


def dense_unit_inference(unit: ConvBNAct, x: jax.Array) -> jax.Array:
    """``unit(x, train=False)`` for a ``kind='full'`` unit, in one native kernel. Check
    :func:`fuses_dense_unit` first."""
    kernel = unit.conv.variables["params"]["kernel"].astype(jnp.float32)
    with jax.named_scope("fused_dense_unit"):
        return _dense_unit(x, kernel, EvalAffine(*unit.bn.eval_affine()), unit.stride,
                           bool(_relu6_flag(unit.activation)))
