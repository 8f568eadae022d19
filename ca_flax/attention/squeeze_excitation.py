"""Squeeze-and-Excitation, as the CA authors' baseline (their detection code)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ca_flax.attention.common import check_feature_map, check_reduction
from ca_flax.layers.activations import ActivationLike, get_activation
from ca_flax.layers.conv import PointwiseConv, conv_kernel_init
from ca_flax.layers.gating import apply_gates
from ca_flax.layers.pooling import pool_global


class SqueezeExcitation(nn.Module):
    """Channel gate from a global average: pool -> 1x1 conv C -> C // reduction (bias)
    -> activation -> 1x1 conv back to C (bias) -> gate -> ``x * gate``. No BatchNorm.

    Attributes:
      reduction: 24 in the CA paper's baseline.
      min_channels: lower bound of the reduced width.
      activation: between the two convs (``'relu6'`` in the authors' baseline).
      gate: ``'sigmoid'`` (the baseline) or e.g. ``'hard_sigmoid'``.
    Submodules: ``reduce``, ``expand``. With ``mutable=['intermediates']`` the gate is
    sown as ``channel_gate`` (N, 1, 1, C).
    """

    reduction: int = 24
    min_channels: int = 1
    activation: ActivationLike = "relu6"
    gate: ActivationLike = "sigmoid"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Gates ``x``; ``train`` is taken for a uniform attention interface (SE has no
        BatchNorm)."""
        del train
        check_feature_map(x, "SqueezeExcitation")
        check_reduction(self.reduction, self.min_channels, "SqueezeExcitation")
        channels = x.shape[-1]
        hidden = max(self.min_channels, channels // self.reduction)
        conv = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_kernel_init)
        s = pool_global(x, self.dtype)
        s = get_activation(self.activation)(PointwiseConv(hidden, name="reduce", **conv)(s))
        s = get_activation(self.gate)(PointwiseConv(channels, name="expand", **conv)(s))
        self.sow("intermediates", "channel_gate", s)  # kept only when 'intermediates' is mutable
        return apply_gates(x, s)
