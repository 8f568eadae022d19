"""Squeeze-and-Excitation, as the CA authors' baseline (their detection code)."""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from ca_flax.attention.common import GATE_SCOPE, check_feature_map, check_reduction, check_sums
from ca_flax.layers.activations import ActivationLike, get_activation
from ca_flax.layers.conv import PointwiseConv, conv_kernel_init
from ca_flax.layers.pooling import DirectionalSums, mean_pool


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

    # Takes ``sums=``: pools from row and column sums a fused producer computed.
    uses_sums: ClassVar[bool] = True

    reduction: int = 24
    min_channels: int = 1
    activation: ActivationLike = "relu6"
    gate: ActivationLike = "sigmoid"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, sums: DirectionalSums | None = None) -> jax.Array:
        """Gates ``x``. ``train`` is accepted for a uniform attention interface (SE has no
        BatchNorm); ``sums``: ``x``'s row and column sums where the layer before computed
        them (``layers/fused.py``), the global pool is then taken from them."""
        del train
        check_feature_map(x, "SqueezeExcitation")
        check_sums(x, sums, "SqueezeExcitation")
        check_reduction(self.reduction, self.min_channels, "SqueezeExcitation")
        channels = x.shape[-1]
        hidden = max(self.min_channels, channels // self.reduction)
        conv = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_kernel_init)
        if sums is None:
            s = mean_pool(x, axis=(1, 2), keepdims=True, dtype=self.dtype)
        else:
            s = sums.global_mean(self.dtype or x.dtype)
        s = get_activation(self.activation)(PointwiseConv(hidden, name="reduce", **conv)(s))
        s = get_activation(self.gate)(PointwiseConv(channels, name="expand", **conv)(s))
        self.sow("intermediates", "channel_gate", s)  # recorded only when mutable (ca_flax.viz)
        with jax.named_scope(GATE_SCOPE):
            return x * s
