"""What every network family provides, and what each gets from this base class.

A family subclasses :class:`Backbone` and writes its network as two methods, the way
its paper draws it:

- ``forward_features(x, train)``: the named feature maps; the deepest (the last of
  ``feature_info()``) is what the classifier pools;
- ``forward_head(deepest_map, train)``: pooling, dropout, classifier;

plus ``feature_info()`` (each map's name, stride and channels, computed without
tracing) and the contract's fields: ``num_classes``, ``dtype``, ``param_dtype``,
``in_channels``. The base class adds the public methods, ``__call__(x, train)`` (logits)
and ``features(x, train)`` (the maps), with their input checks, and runs an eval-mode
batch in micro-batches where that is faster (``models/micro_batch.py``), so no family
file carries any of it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, NamedTuple

import jax
from flax import linen as nn

from ca_flax.models.micro_batch import MicroBatch, eval_micro_batch_size, in_micro_batches, resolve_eval_micro_batch


class FeatureInfo(NamedTuple):
    """One map of ``features()``: its key, its stride relative to the input, its channels."""

    name: str
    stride: int
    channels: int


def _channels_hint(shape: tuple[int, ...], in_channels: int) -> str:
    """How to fix NHWC input of rank 4 whose last axis is not ``in_channels`` long."""
    if shape[1] == in_channels:  # where NCHW keeps the channels
        return "it looks like NCHW: transpose it with x.transpose(0, 2, 3, 1)"
    if (in_channels, shape[-1]) == (3, 4):
        return "4 channels are RGBA: drop the alpha channel with x[..., :3]"
    return f"for {shape[-1]}-channel images create the model with in_channels={shape[-1]}"


def check_mobile_options(model: Any, default_repeats: tuple[int, ...]) -> None:
    """Raises a ValueError naming the fix for a bad ``width_mult``, ``stage_repeats`` (one
    positive integer per stage, ``len(default_repeats)`` stages), ``attention``,
    ``num_classes`` or ``dropout_rate``: the options the MobileNet families share."""
    from ca_flax.attention import ATTENTION_BLOCKS  # attention imports nothing of models

    width = model.width_mult
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"width_mult must be a positive finite number, got {width!r}.")
    repeats = tuple(model.stage_repeats)
    if len(repeats) != len(default_repeats) or any(not isinstance(r, int) or r < 1 for r in repeats):
        raise ValueError(
            f"stage_repeats must be {len(default_repeats)} positive integers (one per stage, default "
            f"{default_repeats}), got {model.stage_repeats!r}."
        )
    if model.attention is not None and model.attention not in ATTENTION_BLOCKS:
        raise ValueError(f"Unknown attention {model.attention!r}; choose one of {sorted(ATTENTION_BLOCKS)} or None.")
    if not isinstance(model.num_classes, int) or model.num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer, got {model.num_classes!r}.")
    if not 0.0 <= model.dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {model.dropout_rate!r}.")


class Backbone(nn.Module):
    """Base class of the network families (see the module docstring).

    Attributes:
      eval_micro_batch: in eval mode, run the batch this many images at a time inside
        the one call (``None``: all at once; ``'auto'``: where that is faster, a
        single-device CPU backend). The outputs are the same.
    """

    # Fields that choose how a model runs, not what it computes: checkpoints do not
    # record them, and a model loads with their defaults. Families add their own.
    runtime_fields: ClassVar[tuple[str, ...]] = ("eval_micro_batch", "dtype", "param_dtype")

    eval_micro_batch: MicroBatch = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_micro_batch != "auto":
            resolve_eval_micro_batch(self.eval_micro_batch)  # raises on a bad setting

    # -- what a family writes -----------------------------------------------------------

    def forward_features(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        raise NotImplementedError(f"{type(self).__name__} must define forward_features(x, train).")

    def forward_head(self, x: jax.Array, train: bool) -> jax.Array:
        raise NotImplementedError(f"{type(self).__name__} must define forward_head(x, train).")

    @nn.nowrap
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """Name, stride and channels of each map :meth:`features` returns, in order."""
        raise NotImplementedError(f"{type(self).__name__} must define feature_info().")

    # -- what every family gets -----------------------------------------------------------

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` for NHWC images ``(N, H, W, in_channels)``
        (pooled features when ``num_classes == 0``).

        ``train=True`` uses batch statistics (pass ``mutable=['batch_stats']``) and
        dropout (pass ``rngs={'dropout': key}``).
        """
        return self._in_micro_batches(Backbone._logits, x, train)

    def features(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Feature maps for detection and segmentation heads, keyed as :meth:`feature_info`
        names them (``jax`` returns dicts with sorted keys; ``feature_info`` keeps the
        order). Usage: ``model.apply(variables, x, method=model.features)``."""
        return self._in_micro_batches(Backbone._features, x, train)

    def _features(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        if self.dtype is not None:
            x = x.astype(self.dtype)
        return self.forward_features(x, train)

    def _logits(self, x: jax.Array, train: bool) -> jax.Array:
        # Through the public method, so capture_intermediates and interceptors see it.
        maps = self.features(x, train)
        return self.forward_head(maps[self.feature_info()[-1].name], train)

    def _in_micro_batches(self, method: Callable[..., Any], x: jax.Array, train: bool) -> Any:
        """``method(self, x, train)``, in eval mode ``eval_micro_batch`` images at a time."""
        self._check_input(x)
        size = eval_micro_batch_size(self, self.eval_micro_batch, x, train)
        if size is None:
            return method(self, x, train)
        return in_micro_batches(self, lambda model, chunk: method(model, chunk, False), x, size)

    @nn.nowrap
    def _check_input(self, x: jax.Array) -> None:
        name, channels = type(self).__name__, getattr(self, "in_channels", None)
        if x.ndim != 4:
            raise ValueError(
                f"{name} expects NHWC images of rank 4 (batch, height, width, {channels or 'channels'}), "
                f"got shape {x.shape}; add a batch axis with x[None] for a single image."
            )
        if channels is not None and x.shape[-1] != channels:
            raise ValueError(
                f"{name} expects {channels} channels on the last axis (NHWC), got {x.shape[-1]} "
                f"in shape {x.shape}; {_channels_hint(x.shape, channels)}."
            )


__all__ = ["Backbone", "FeatureInfo", "check_mobile_options"]
