"""MobileNetV2 (Sandler et al., CVPR 2018) with an optional attention block, as in the
Coordinate Attention paper: one configurable module covers the paper's baseline, +SE,
+CBAM and +CA networks at any width, and timm's deeper/wider variants."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from ca_flax.attention import create_attention
from ca_flax.layers.activations import ActivationLike
from ca_flax.layers.conv import dense_kernel_init
from ca_flax.layers.depthwise import DepthwiseImpl
from ca_flax.layers.pooling import mean_pool
from ca_flax.layers.units import ConvBNAct, unit_settings
from ca_flax.models.backbone import Backbone, FeatureInfo, check_mobile_options

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


class BlockSpec(NamedTuple):
    """One inverted residual of a :class:`MobileNetV2`: its stage, output width, stride and
    expansion ``t``."""

    stage: int
    out_channels: int
    stride: int
    expansion: int


class InvertedResidual(nn.Module):
    """Inverted residual block: [1x1 expand, BN, act] -> depthwise 3x3, BN, act ->
    [attention] -> 1x1 project, BN (linear), plus the input when shapes allow.

    With ``expansion == 1`` there is no expand conv and, as in the CA paper, no
    attention. Submodules: ``expand``, ``depthwise``, ``attention``, ``project``.
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
        unit = unit_settings(self)
        expand = None
        if self.expansion != 1:
            expand = ConvBNAct(hidden, kernel_size=1, kind="pointwise", name="expand", **unit)
        depthwise = ConvBNAct(hidden, kernel_size=3, stride=self.stride, kind="depthwise", name="depthwise", **unit)
        project = ConvBNAct(self.features, kernel_size=1, kind="pointwise", name="project", **{**unit, "activation": None})

        y = depthwise(x, train, producer=expand)  # depthwise(expand(x))
        if self.attention is not None and self.expansion != 1:
            kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype, **(self.attention_kwargs or {}))
            y = create_attention(self.attention, name="attention", **kwargs)(y, train)
        y = project(y, train)
        if self.stride == 1 and in_channels == self.features:
            y = x + y
        return y


class MobileNetV2(Backbone):
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
      eval_micro_batch: see :class:`~ca_flax.models.backbone.Backbone`.

    ``__call__(x, train)`` maps NHWC images to logits; ``features(x, train)`` returns the
    maps of the stem, each stage's last block and the head (see :meth:`feature_info`).
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

    runtime_fields: ClassVar[tuple[str, ...]] = Backbone.runtime_fields + ("depthwise_impl",)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate()

    @nn.nowrap
    def _validate(self) -> None:
        check_mobile_options(self, DEFAULT_REPEATS)
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
    def block_specs(self) -> list[BlockSpec]:
        """Every inverted residual, in order."""
        specs = []
        for stage, ((t, c, _, s), n) in enumerate(zip(STAGES, self.stage_repeats)):
            out = make_divisible(c * self.width_mult, self.divisor)
            specs.extend(BlockSpec(stage, out, s if i == 0 else 1, t) for i in range(n))
        return specs

    # -- network ----------------------------------------------------------------------

    def setup(self) -> None:
        unit = unit_settings(self)
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
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The stem, each stage's last block, and the head's 1x1 conv (stride 32)."""
        info, stride = {"stem": FeatureInfo("stem", 2, self.stem_width)}, 2
        for stage, out, block_stride, _ in self.block_specs():
            stride *= block_stride
            info[f"stage{stage}"] = FeatureInfo(f"stage{stage}", stride, out)  # the stage's last block
        info["head"] = FeatureInfo("head", stride, self.head_width)
        return tuple(info.values())

    def forward_features(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        maps = {"stem": self.stem(x, train)}
        y = maps["stem"]
        specs = self.block_specs()
        for i, (block, (stage, *_)) in enumerate(zip(self.blocks, specs)):
            y = block(y, train)
            if i + 1 == len(specs) or specs[i + 1][0] != stage:
                maps[f"stage{stage}"] = y
        maps["head"] = self.head(y, train)
        return maps

    def forward_head(self, x: jax.Array, train: bool) -> jax.Array:
        y = mean_pool(x, axis=(1, 2))
        if not self.num_classes:
            return y
        y = self.dropout(y, deterministic=not train)
        return self.classifier(y)
