"""CBAM (Woo et al., ECCV 2018): channel attention, then spatial attention."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ca_flax.attention.common import check_feature_map, check_reduction
from ca_flax.layers.activations import ActivationLike, get_activation
from ca_flax.layers.conv import PointwiseConv, conv_kernel_init
from ca_flax.layers.gating import apply_gates
from ca_flax.layers.pooling import mean_pool, pool_global
from ca_flax.layers.units import ConvBNAct


class CBAM(nn.Module):
    """Convolutional Block Attention Module, the CA paper's second baseline.

    Channel attention: a shared MLP (1x1 convs with bias, C -> C // reduction -> C) on the
    global average- and max-pooled descriptors, summed, sigmoid, ``x * gate``.
    Spatial attention: the channel-wise max and mean maps (in that order, as the CBAM
    code), a ``spatial_kernel_size`` conv to one channel without bias, BatchNorm, sigmoid,
    ``x * gate``. With reduction 24 MobileNetV2+CBAM has 3,889,808 parameters, the
    paper's 3.89M.

    Submodules: ``mlp_reduce``, ``mlp_expand``, ``spatial`` (``conv`` + ``bn``). With
    ``mutable=['intermediates']`` the gates are sown as ``channel_gate`` (N, 1, 1, C) and
    ``spatial_gate`` (N, H, W, 1).
    """

    reduction: int = 24
    min_channels: int = 1
    activation: ActivationLike = "relu"
    spatial_kernel_size: int = 7
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_feature_map(x, "CBAM")
        check_reduction(self.reduction, self.min_channels, "CBAM")
        channels = x.shape[-1]
        hidden = max(self.min_channels, channels // self.reduction)
        dtype = self.dtype or x.dtype
        conv = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_kernel_init)
        reduce = PointwiseConv(hidden, name="mlp_reduce", **conv)
        expand = PointwiseConv(channels, name="mlp_expand", **conv)
        act = get_activation(self.activation)

        def mlp(v: jax.Array) -> jax.Array:
            return expand(act(reduce(v)))

        avg = pool_global(x, dtype)
        mx = jnp.max(x, axis=(1, 2), keepdims=True).astype(dtype)
        channel_gate = jax.nn.sigmoid(mlp(avg) + mlp(mx))
        self.sow("intermediates", "channel_gate", channel_gate)  # kept only when 'intermediates' is mutable
        x = apply_gates(x, channel_gate)

        pooled = jnp.concatenate(
            [jnp.max(x, axis=-1, keepdims=True).astype(dtype),
             mean_pool(x, axis=-1, keepdims=True, dtype=dtype)],
            axis=-1,
        )
        gate = ConvBNAct(
            1, kernel_size=self.spatial_kernel_size, kind="full", activation="sigmoid",
            bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
            dtype=self.dtype, param_dtype=self.param_dtype, name="spatial",
        )(pooled, train=train)
        self.sow("intermediates", "spatial_gate", gate)
        return apply_gates(x, gate)
