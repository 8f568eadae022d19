"""Coordinate Attention (Hou, Zhou, Feng, CVPR 2021), exactly as the released block."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import linen as nn

from ca_flax.attention.common import GATE_SCOPE, check_feature_map, check_reduction, check_sums
from ca_flax.layers.activations import ActivationLike, get_activation
from ca_flax.layers.conv import PointwiseConv, conv_kernel_init
from ca_flax.layers.norm import BatchNorm
from ca_flax.layers.pooling import DirectionalSums, mean_pool
from ca_flax.layers.recompute import recompute_in_backward

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
    MobileNetV2 code's ``conv1``, ``bn1``, ``conv2``, ``conv3``; ``gate_h``/``gate_w``
    output the gates before their sigmoid). With ``mutable=['intermediates']`` the gates
    themselves are sown as ``a_h`` (N, H, 1, C) and ``a_w`` (N, 1, W, C).
    """

    # Takes ``sums=``: pools from row and column sums a fused producer computed.
    uses_sums: ClassVar[bool] = True

    reduction: int = 32
    min_channels: int = 8
    activation: ActivationLike = "hard_swish"
    directions: Directions = "both"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, sums: DirectionalSums | None = None) -> jax.Array:
        """Gates ``x``. ``sums``: ``x``'s row and column sums where the layer before
        computed them (``layers/fused.py``); the pools are then taken from them."""
        check_feature_map(x, "CoordinateAttention")
        check_sums(x, sums, "CoordinateAttention")
        check_reduction(self.reduction, self.min_channels, "CoordinateAttention")
        if self.directions not in ("both", "h", "w"):
            raise ValueError(f"CoordinateAttention: directions must be 'both', 'h' or 'w', got {self.directions!r}.")
        _, height, width, channels = x.shape
        mip = max(self.min_channels, channels // self.reduction)
        dtype = self.dtype or x.dtype
        conv = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_kernel_init)

        # Directional average pools: (N, H, C) and (N, W, C).
        strips = []
        if self.directions in ("both", "h"):
            strips.append(mean_pool(x, axis=2, dtype=dtype) if sums is None else sums.row_means(dtype))
        if self.directions in ("both", "w"):
            strips.append(mean_pool(x, axis=1, dtype=dtype) if sums is None else sums.col_means(dtype))
        y = jnp.concatenate(strips, axis=1) if len(strips) > 1 else strips[0]

        y = PointwiseConv(mip, use_bias=True, name="reduce", **conv)(y)
        # Statistics over N and all H + W positions jointly, as BatchNorm2d on the
        # concatenated (N, mip, H + W, 1) tensor of the released code; the activation
        # runs inside it (same values, one op less to store and to trace).
        y = BatchNorm(
            momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
            param_dtype=self.param_dtype, activation=get_activation(self.activation), name="bn",
        )(y, use_running_average=not train)

        if self.directions == "both":
            y_h, y_w = y[:, :height], y[:, height:]
        else:
            y_h = y_w = y
        a_w = a_h = None
        if self.directions in ("both", "w"):
            a_w = jax.nn.sigmoid(PointwiseConv(channels, use_bias=True, name="gate_w", **conv)(y_w))[:, None, :, :]
        if self.directions in ("both", "h"):
            a_h = jax.nn.sigmoid(PointwiseConv(channels, use_bias=True, name="gate_h", **conv)(y_h))[:, :, None, :]
        # Recorded only when 'intermediates' is mutable (ca_flax.viz draws them); a no-op otherwise.
        for name, gate in (("a_h", a_h), ("a_w", a_w)):
            if gate is not None:
                self.sow("intermediates", name, gate)
        with jax.named_scope(GATE_SCOPE):
            return _apply_gates(x, a_w, a_h)


def _gates_math(x: jax.Array, a_w: jax.Array | None, a_h: jax.Array | None) -> jax.Array:
    """``x * a_w * a_h``, in the released code's order (so rounding matches it)."""
    out = x
    if a_w is not None:
        out = out * a_w
    if a_h is not None:
        out = out * a_h
    return out


# Recomputed in the backward pass from its inputs: stored, ``x * a_w`` would be one more
# feature map per block, and computing the product in one pass is faster than writing
# and re-reading it.
_apply_gates = recompute_in_backward(_gates_math)
