"""Input checks every attention block shares."""

from __future__ import annotations

import jax


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
