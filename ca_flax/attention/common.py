"""Pieces every attention block shares: input checks and the gate's name scope."""

from __future__ import annotations

import jax

from ca_flax.layers.pooling import DirectionalSums

# Name scope of the products that apply an attention gate to the feature map: the
# model summary counts them as multiply-adds, as the paper's MAdds figures do.
GATE_SCOPE = "gate"


def check_feature_map(x: jax.Array, name: str) -> None:
    """Raises a ValueError naming the block unless ``x`` is an NHWC map (rank 4)."""
    if x.ndim != 4:
        raise ValueError(f"{name} expects an NHWC feature map of rank 4, got shape {x.shape}.")


def check_reduction(reduction: int, min_channels: int, name: str) -> None:
    """Raises a ValueError naming the block unless both are positive integers."""
    if not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"{name}: reduction must be a positive integer, got {reduction!r}.")
    if not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"{name}: min_channels must be a positive integer, got {min_channels!r}.")


def check_sums(x: jax.Array, sums: DirectionalSums | None, name: str) -> None:
    """Raises a ValueError naming the block unless ``sums`` is None or holds the row
    sums ``(N, H, C)`` and column sums ``(N, W, C)`` of the NHWC map ``x``."""
    if sums is None:
        return
    n, h, w, c = x.shape
    if tuple(sums.rows.shape) != (n, h, c) or tuple(sums.cols.shape) != (n, w, c):
        raise ValueError(
            f"{name}: sums must be the row sums (N, H, C) = {(n, h, c)} and column sums (N, W, C) = {(n, w, c)} "
            f"of the input {x.shape}; got {tuple(sums.rows.shape)} and {tuple(sums.cols.shape)}."
        )
