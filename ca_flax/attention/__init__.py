"""Attention blocks that plug into any NHWC feature map: CA and the paper's baselines.

Every block is called as ``block(x, train)`` and returns a tensor of ``x``'s shape.
:func:`create_attention` builds one by name, which is how networks take an
``attention='ca'`` option.
"""

from __future__ import annotations

from typing import Any

from flax import linen as nn

from ca_flax.attention.cbam import CBAM
from ca_flax.attention.coordinate import CoordinateAttention
from ca_flax.attention.squeeze_excitation import SqueezeExcitation

ATTENTION_BLOCKS: dict[str, type[nn.Module]] = {
    "ca": CoordinateAttention,
    "se": SqueezeExcitation,
    "cbam": CBAM,
}


def create_attention(kind: str, **kwargs: Any) -> nn.Module:
    """Returns the attention block registered as ``kind`` ('ca', 'se' or 'cbam')."""
    try:
        cls = ATTENTION_BLOCKS[kind]
    except KeyError:
        raise ValueError(
            f"Unknown attention {kind!r}; choose one of {sorted(ATTENTION_BLOCKS)} (or None for no attention)."
        ) from None
    return cls(**kwargs)


__all__ = ["ATTENTION_BLOCKS", "CBAM", "CoordinateAttention", "SqueezeExcitation", "create_attention"]
