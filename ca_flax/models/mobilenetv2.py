"""MobileNetV2 (Sandler et al., CVPR 2018) with an optional attention block, as in the
Coordinate Attention paper: one configurable module covers the paper's baseline, +SE,
+CBAM and +CA networks at any width, and timm's deeper/wider variants."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from ca_flax.attention import ATTENTION_BLOCKS, create_attention
from ca_flax.layers.activations import ActivationLike
from ca_flax.layers.conv import ConvBNAct, dense_kernel_init
from ca_flax.layers.depthwise import DepthwiseImpl
from ca_flax.layers.fused import dense_unit_inference, depthwise_unit_inference, fuses_dense_unit, fuses_depthwise_unit
from ca_flax.layers.pooling import mean_pool
from ca_flax.models.micro_batch import MicroBatch, eval_micro_batch_size, in_micro_batches, resolve_eval_micro_batch

# (expansion t, channels c, repeats n, first stride s) of the seven stages.
STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
DEFAULT_REPEATS: tuple[int, ...] = tuple(n for _, _, n, _ in STAGES)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Rounds ``value`` to the nearest multiple of ``divisor``, never below ``min_value``
    (default ``divisor``) and never more than 10% below ``value``: the MobileNet rule."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """Inverted residual block: [1x1 expand, BN, act] -> depthwise 3x3, BN, act ->
    [attention] -> 1x1 project, BN (linear), plus the input when shapes allow.

    With ``expansion == 1`` there is no expand conv and, as in the CA paper, no
    attention. Submodules: ``expand``, ``depthwise``, ``attention``, ``project``. In eval
    mode on CPU (float32, ReLU6) the expand BatchNorm through the depthwise unit and the
    attention's pools run as one native kernel (``layers/fused.py``); same parameters,
    same values to float rounding.
    """

    features: int
    stride: int
    expansion: int
    attention: str | None = None
    attention_kwargs: Mapping[str, Any] | None = None
    activation: ActivationLike = "relu6"
    depthwise_impl: DepthwiseImpl = "auto"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        in_channels = x.shape[-1]
        hidden = int(round(in_channels * self.expansion))
        unit = dict(
            activation=self.activation, depthwise_impl=self.depthwise_impl, bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
        )
        expand = None
        if self.expansion != 1:
            expand = ConvBNAct(hidden, kernel_size=1, kind="pointwise", name="expand", **unit)
        depthwise = ConvBNAct(hidden, kernel_size=3, stride=self.stride, kind="depthwise", name="depthwise", **unit)
        attention = None
        if self.attention is not None and self.expansion != 1:
            kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype, **(self.attention_kwargs or {}))
            attention = create_attention(self.attention, name="attention", **kwargs)
        if fuses_depthwise_unit(self, depthwise, expand, x, train):
            # Eval mode on CPU: expand's BatchNorm and ReLU6 through the depthwise unit
            # and the attention's pools in one native pass (layers/fused.py).
            y, sums = depthwise_unit_inference(depthwise, expand, x)
            if attention is not None:
                y = attention(y, train, sums=sums) if getattr(attention, "uses_sums", False) else attention(y, train)
        else:
            y = expand(x, train) if expand is not None else x
            y = depthwise(y, train)
            if attention is not None:
                y = attention(y, train)
        y = ConvBNAct(self.features, kernel_size=1, kind="pointwise", name="project", **{**unit, "activation": None})(
            y, train
        )
        if self.stride == 1 and in_channels == self.features:
            y = x + y
        return y


def _channels_hint(shape: tuple[int, ...], in_channels: int) -> str:
    """How to fix NHWC input of rank 4 whose last axis is not ``in_channels`` long."""
    if shape[1] == in_channels:  # where NCHW keeps the channels
        return "it looks like NCHW: transpose it with x.transpose(0, 2, 3, 1)"
    if (in_channels, shape[-1]) == (3, 4):
        return "4 channels are RGBA: drop the alpha channel with x[..., :3]"
    return f"for {shape[-1]}-channel images create the model with in_channels={shape[-1]}"


class MobileNetV2(nn.Module):
    """MobileNetV2 with an optional attention block in every t != 1 inverted residual.

    Attributes:
      num_classes: classifier outputs (0: no classifier; ``__call__`` returns pooled features).
      width_mult: channel multiplier; channels are ``make_divisible(c * width_mult, 8)``
        (divisor 4 at width 0.1, as the released code).
      stage_repeats: blocks per stage (7 entries; timm's 110d/120d deepen it).
      stem_channels: stem width (default ``make_divisible(32 * width_mult)``).
      head_channels: last 1x1 conv width (default 1280, scaled only when width > 1).
      attention: ``None``, ``'se'``, ``'cbam'`` or ``'ca'``, after the depthwise conv's
        BN + ReLU6 of every block with expansion != 1.
      attention_kwargs: extra options for the attention block (e.g. ``reduction``).
      dropout_rate: before the classifier (0.1 in the released MobileNetV2+CA).
      activation: of every conv unit (ReLU6).
      depthwise_impl: ``'auto'``, ``'xla'``, ``'shift'`` or ``'shift_vjp'``; parameters are
        the same whichever is used.
      in_channels: expected input channels.
      bn_momentum, bn_epsilon: BatchNorm settings, PyTorch's defaults.
      dtype: computation dtype (``jnp.bfloat16`` for mixed precision); parameters and
        BatchNorm statistics stay ``param_dtype`` (float32).
      eval_micro_batch: in eval mode, run the batch this many images at a time inside
        the one call (``None``: all at once; ``'auto'``: 8 on a single-device CPU backend,
        where it is faster, else all at once). The outputs are the same: see
        ``models/micro_batch.py``.

    ``__call__(x, train)`` maps NHWC images to logits; ``features(x, train)`` returns the
    feature maps of the stem, each stage and the head (see :meth:`features`).
    """

    num_classes: int = 1000
    width_mult: float = 1.0
    stage_repeats: Sequence[int] = DEFAULT_REPEATS
    stem_channels: int | None = None
    head_channels: int | None = None
    attention: str | None = None
    attention_kwargs: Mapping[str, Any] | None = None
    dropout_rate: float = 0.1
    activation: ActivationLike = "relu6"
    depthwise_impl: DepthwiseImpl = "auto"
    in_channels: int = 3
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    eval_micro_batch: MicroBatch = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate()

    @nn.nowrap
    def _validate(self) -> None:
        if not (isinstance(self.width_mult, (int, float)) and math.isfinite(self.width_mult) and self.width_mult > 0):
            raise ValueError(f"width_mult must be a positive finite number, got {self.width_mult!r}.")
        repeats = tuple(self.stage_repeats)
        if len(repeats) != len(STAGES) or any(not isinstance(r, int) or r < 1 for r in repeats):
            raise ValueError(
                f"stage_repeats must be {len(STAGES)} positive integers (one per stage, default "
                f"{DEFAULT_REPEATS}), got {self.stage_repeats!r}."
            )
        if self.attention is not None and self.attention not in ATTENTION_BLOCKS:
            raise ValueError(f"Unknown attention {self.attention!r}; choose one of {sorted(ATTENTION_BLOCKS)} or None.")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {self.num_classes!r}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")
        if self.eval_micro_batch != "auto":
            resolve_eval_micro_batch(self.eval_micro_batch)  # raises on a bad setting
        for name in ("stem_channels", "head_channels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")

    # -- architecture arithmetic, shared with the converters and the summary ----------

    @property
    def divisor(self) -> int:
        return 4 if self.width_mult == 0.1 else 8

    @property
    def stem_width(self) -> int:
        return self.stem_channels or make_divisible(32 * self.width_mult, self.divisor)

    @property
    def head_width(self) -> int:
        if self.head_channels:
            return self.head_channels
        return make_divisible(1280 * self.width_mult, self.divisor) if self.width_mult > 1.0 else 1280

    @nn.nowrap
    def block_specs(self) -> list[tuple[int, int, int, int]]:
        """``(stage, out_channels, stride, expansion)`` of every inverted residual, in order."""
        specs = []
        for stage, ((t, c, _, s), n) in enumerate(zip(STAGES, self.stage_repeats)):
            out = make_divisible(c * self.width_mult, self.divisor)
            specs.extend((stage, out, s if i == 0 else 1, t) for i in range(n))
        return specs

    # -- network ----------------------------------------------------------------------

    def setup(self) -> None:
        unit = dict(
            activation=self.activation, depthwise_impl=self.depthwise_impl, bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
        )
        self.stem = ConvBNAct(self.stem_width, kernel_size=3, stride=2, kind="full", **unit)
        self.blocks = [
            InvertedResidual(
                out, stride, t, attention=self.attention, attention_kwargs=self.attention_kwargs, **unit
            )
            for _, out, stride, t in self.block_specs()
        ]
        self.head = ConvBNAct(self.head_width, kernel_size=1, kind="pointwise", **unit)
        self.dropout = nn.Dropout(self.dropout_rate)
        if self.num_classes:
            self.classifier = nn.Dense(
                self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=dense_kernel_init
            )

    @nn.nowrap
    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4:
            raise ValueError(
                f"MobileNetV2 expects NHWC images of rank 4 (batch, height, width, {self.in_channels}), "
                f"got shape {x.shape}; add a batch axis with x[None] for a single image."
            )
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"MobileNetV2 expects {self.in_channels} channels on the last axis (NHWC), got {x.shape[-1]} "
                f"in shape {x.shape}; {_channels_hint(x.shape, self.in_channels)}."
            )

    def features(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Feature maps for detection and segmentation heads.

        Returns ``{'stem', 'stage0', ..., 'stage6', 'head'}``: each stage's last block
        output (strides 2, 2, 4, 8, 16, 16, 32, 32 relative to the input, then the final
        1x1 conv at stride 32). Usage:
        ``model.apply(variables, x, method=model.features)``.
        """
        return self._eval_in_micro_batches(MobileNetV2._features, x, train)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` for NHWC images ``(N, H, W, in_channels)``.

        ``train=True`` uses batch statistics (pass ``mutable=['batch_stats']``) and
        dropout (pass ``rngs={'dropout': key}``).
        """
        return self._eval_in_micro_batches(MobileNetV2._logits, x, train)

    def _eval_in_micro_batches(self, method: Callable[..., Any], x: jax.Array, train: bool) -> Any:
        """``method(self, x, train)``, in eval mode ``eval_micro_batch`` images at a time."""
        self._check_input(x)
        size = eval_micro_batch_size(self, self.eval_micro_batch, x, train)
        if size is None:
            return method(self, x, train)
        return in_micro_batches(self, lambda model, chunk: method(model, chunk, False), x, size)

    def _features(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        if self.dtype is not None:
            x = x.astype(self.dtype)
        if fuses_dense_unit(self, self.stem, x, train):  # eval mode on CPU: layers/fused.py
            maps = {"stem": dense_unit_inference(self.stem, x)}
        else:
            maps = {"stem": self.stem(x, train)}
        y = maps["stem"]
        specs = self.block_specs()
        for i, (block, (stage, *_)) in enumerate(zip(self.blocks, specs)):
            y = block(y, train)
            if i + 1 == len(specs) or specs[i + 1][0] != stage:
                maps[f"stage{stage}"] = y
        maps["head"] = self.head(y, train)
        return maps

    def _logits(self, x: jax.Array, train: bool) -> jax.Array:
        # Through the public method, so capture_intermediates and interceptors see it.
        y = self.features(x, train)["head"]
        y = mean_pool(y, axis=(1, 2))
        if not self.num_classes:
            return y
        y = self.dropout(y, deterministic=not train)
        return self.classifier(y)
