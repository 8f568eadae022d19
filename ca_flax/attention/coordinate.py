"""Coordinate Attention (Hou, Zhou, Feng, CVPR 2021), exactly as the released block."""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import linen as nn

from ca_flax.attention.common import check_feature_map, check_reduction
from ca_flax.layers.activations import ActivationLike, get_activation
from ca_flax.layers.conv import PointwiseConv, conv_kernel_init
from ca_flax.layers.gating import apply_gates
from ca_flax.layers.norm import BatchNorm
from ca_flax.layers.pooling import pool_cols, pool_rows

Directions = Literal["both", "h", "w"]


class CoordinateAttention(nn.Module):
    """Coordinate Attention on an NHWC feature map; the output has the input's shape.

    1. Pool along W (one descriptor per row) and along H (one per column).
    2. Concatenate the H + W strips, 1x1 conv (with bias) to ``mip = max(min_channels,
       C // reduction)`` channels, BatchNorm with statistics shared by all H + W
       positions, activation (h_swish).
    3. Split back, a 1x1 conv (with bias) and a sigmoid per direction give ``a_h``
       (N, H, 1, C) and ``a_w`` (N, 1, W, C); the output is ``x * a_w * a_h``.

    Attributes:
      reduction: channel reduction of the shared 1x1 conv (32 in the paper).
      min_channels: lower bound of the reduced width (8 in the paper).
      activation: after the shared conv's BatchNorm (``'hard_swish'``; the authors
        report it beats ReLU6 here).
      directions: ``'both'`` (the paper's block), or ``'h'`` / ``'w'`` for attention along
        one direction only (the paper's ablation: the other gate is dropped, not set to 1
        by a layer, so no parameters exist for it).
      dtype, param_dtype: computation and parameter dtypes.
    Submodules: ``reduce`` (shared conv), ``bn``, ``gate_h``, ``gate_w`` (the released
    MobileNetV2 code's ``conv1``, ``bn1``, ``conv2``, ``conv3``). With
    ``mutable=['intermediates']`` the gates are sown as ``a_h`` and ``a_w``.
    """

    reduction: int = 32
    min_channels: int = 8
    activation: ActivationLike = "hard_swish"
    directions: Directions = "both"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_feature_map(x, "CoordinateAttention")
        check_reduction(self.reduction, self.min_channels, "CoordinateAttention")
        if self.directions not in ("both", "h", "w"):
            raise ValueError(f"CoordinateAttention: directions must be 'both', 'h' or 'w', got {self.directions!r}.")
        _, height, _, channels = x.shape
        mip = max(self.min_channels, channels // self.reduction)
        dtype = self.dtype or x.dtype
        conv = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_kernel_init)
        use_h, use_w = self.directions in ("both", "h"), self.directions in ("both", "w")

        # Directional average pools, (N, H, C) and (N, W, C), one strip of H + W.
        strips = ([pool_rows(x, dtype)] if use_h else []) + ([pool_cols(x, dtype)] if use_w else [])
        y = jnp.concatenate(strips, axis=1)

        # Shared 1x1 conv; BatchNorm over N and all H + W positions jointly, as
        # BatchNorm2d on the released code's concatenated (N, mip, H + W, 1) tensor.
        y = PointwiseConv(mip, name="reduce", **conv)(y)
        y = BatchNorm(
            momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
            activation=get_activation(self.activation), name="bn",
        )(y, use_running_average=not train)

        # One gate per direction.
        y_h, y_w = (y[:, :height], y[:, height:]) if use_h and use_w else (y, y)
        gates = []
        if use_w:
            a_w = jax.nn.sigmoid(PointwiseConv(channels, name="gate_w", **conv)(y_w))[:, None, :, :]
            self.sow("intermediates", "a_w", a_w)  # kept only when 'intermediates' is mutable
            gates.append(a_w)
        if use_h:
            a_h = jax.nn.sigmoid(PointwiseConv(channels, name="gate_h", **conv)(y_h))[:, :, None, :]
            self.sow("intermediates", "a_h", a_h)
            gates.append(a_h)
        return apply_gates(x, *gates)  # x * a_w * a_h
