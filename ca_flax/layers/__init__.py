"""Building blocks shared by the attention modules and the networks."""

from ca_flax.layers.activations import get_activation, hard_sigmoid, hard_swish, list_activations, relu6
from ca_flax.layers.conv import (
    Conv,
    PointwiseConv,
    conv2d,
    conv_kernel_init,
    dense_kernel_init,
    symmetric_padding,
)
from ca_flax.layers.depthwise import IMPLEMENTATIONS as DEPTHWISE_IMPLEMENTATIONS
from ca_flax.layers.depthwise import DepthwiseConv, depthwise_conv, resolve_impl
from ca_flax.layers.norm import BatchNorm
from ca_flax.layers.gating import apply_gates
from ca_flax.layers.pooling import mean_pool, pool_cols, pool_global, pool_rows
from ca_flax.layers.units import ConvBNAct

__all__ = [
    "BatchNorm",
    "Conv",
    "ConvBNAct",
    "DEPTHWISE_IMPLEMENTATIONS",
    "DepthwiseConv",
    "PointwiseConv",
    "apply_gates",
    "conv2d",
    "conv_kernel_init",
    "dense_kernel_init",
    "depthwise_conv",
    "get_activation",
    "hard_sigmoid",
    "hard_swish",
    "list_activations",
    "mean_pool",
    "pool_cols",
    "pool_global",
    "pool_rows",
    "relu6",
    "resolve_impl",
    "symmetric_padding",
]
