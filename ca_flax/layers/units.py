"""The conv -> BatchNorm -> activation unit MobileNets are built from.

A unit picks its own fast path: in eval mode on CPU a dense unit with few input
channels (a stem) and a depthwise unit, together with the 1x1 unit that produces its
input, each run as one native kernel (``layers/fused.py``). The depthwise kernel also
writes its output's row and column sums, which the pools of an attention block after
it reuse (``layers/pooling.py``). Models call units the plain way and never see this.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import linen as nn

from ca_flax.layers import fused
from ca_flax.layers.activations import ActivationLike, get_activation
from ca_flax.layers.conv import Conv, PointwiseConv, conv_kernel_init
from ca_flax.layers.depthwise import DepthwiseConv, DepthwiseImpl
from ca_flax.layers.norm import BatchNorm
from ca_flax.layers.pooling import remember_sums

ConvKind = Literal["full", "depthwise", "pointwise"]


class ConvBNAct(nn.Module):
    """Convolution (no bias) -> BatchNorm -> activation.

    Attributes:
      features: output channels (ignored for ``kind='depthwise'``: same as input).
      kernel_size: spatial size; padding is ``kernel_size // 2`` on every side.
      stride: spatial stride.
      kind: ``'full'`` (dense k x k conv), ``'depthwise'`` or ``'pointwise'`` (1x1).
      activation: name or callable, ``None`` for a linear unit.
      depthwise_impl: implementation of depthwise convolutions (see ``DepthwiseConv``);
        ``'auto'`` also allows the fused inference kernel.
      bn_momentum, bn_epsilon: BatchNorm settings (PyTorch defaults).
    Submodules are named ``conv`` and ``bn``.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    kind: ConvKind = "full"
    activation: ActivationLike = "relu6"
    depthwise_impl: DepthwiseImpl = "auto"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_kernel_init)
        if self.kind == "depthwise":
            self.conv = DepthwiseConv(kernel_size=self.kernel_size, stride=self.stride, impl=self.depthwise_impl, **common)
        elif self.kind == "pointwise":
            if self.kernel_size != 1 or self.stride != 1:
                raise ValueError("A pointwise convolution has kernel_size 1 and stride 1.")
            self.conv = PointwiseConv(self.features, **common)
        elif self.kind == "full":
            self.conv = Conv(self.features, self.kernel_size, self.stride, **common)
        else:
            raise ValueError(f"Unknown convolution kind {self.kind!r}; use 'full', 'depthwise' or 'pointwise'.")
        # The activation runs inside BatchNorm, where the backward pass recomputes it.
        activation = get_activation(self.activation) if self.activation is not None else None
        self.bn = BatchNorm(
            momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
            param_dtype=self.param_dtype, activation=activation,
        )

    def __call__(self, x: jax.Array, train: bool = False, producer: ConvBNAct | None = None) -> jax.Array:
        """Convolution, then BatchNorm (batch statistics when ``train``) and activation.

        ``producer``: for a depthwise unit, the pointwise unit that makes its input from
        ``x`` (an inverted residual's expand conv). The result is ``self(producer(x))``;
        passing it lets the unit fuse the two at inference (see the module docstring).
        """
        if producer is not None and (self.kind != "depthwise" or producer.kind != "pointwise"):
            raise ValueError(
                f"A producer is taken by a depthwise unit, and must be a pointwise unit; got a {producer.kind} "
                f"producer for a {self.kind} unit. Call the units one after the other instead."
            )
        if fused.fuses_depthwise_unit(self, producer, x, train):
            y, sums = fused.depthwise_unit_inference(self, producer, x)
            remember_sums(y, sums)
            return y
        if fused.fuses_dense_unit(self, x, train):
            return fused.dense_unit_inference(self, x)
        if producer is not None:
            x = producer(x, train)
        return self.bn(self.conv(x), use_running_average=not train)

    def convolve(self, x: jax.Array) -> jax.Array:
        """The convolution alone, before BatchNorm (for the fused kernels)."""
        return self.conv(x)


# The settings a network hands down to every unit it builds.
UNIT_SETTINGS = ("activation", "depthwise_impl", "bn_momentum", "bn_epsilon", "dtype", "param_dtype")


def unit_settings(module: nn.Module) -> dict[str, Any]:
    """``module``'s values of :data:`UNIT_SETTINGS`, as keyword arguments for its units."""
    return {name: getattr(module, name) for name in UNIT_SETTINGS}


__all__ = ["ConvBNAct", "ConvKind", "UNIT_SETTINGS", "unit_settings"]
