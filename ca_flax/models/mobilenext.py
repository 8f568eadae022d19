"""MobileNeXt (Zhou, Hou, Chen, Feng, Yan, ECCV 2020), the Coordinate Attention paper's
second backbone, with an optional attention block.

The sandglass block turns MobileNetV2's inverted residual around: the depthwise
convolutions sit at both ends, on the wide maps, and the two 1x1 convolutions reduce and
expand in between; the shortcut joins the wide maps. Everything here follows the
authors' ``mnext.py`` (see docs/mobilenext.md for the block table and the attention
placements).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Mapping, NamedTuple, Sequence

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
from ca_flax.models.mobilenetv2 import make_divisible

# (reduction t, channels c, repeats n, first stride s) of the eight stages.
STAGES: tuple[tuple[int, int, int, int], ...] = (
    (2, 96, 1, 2),
    (6, 144, 1, 1),
    (6, 192, 3, 2),
    (6, 288, 3, 2),
    (6, 384, 4, 1),
    (6, 576, 4, 2),
    (6, 960, 3, 1),
    (6, 1280, 1, 1),
)
DEFAULT_REPEATS: tuple[int, ...] = tuple(n for _, _, n, _ in STAGES)

AttentionPosition = Literal["first_dw", "first_dw_or_expand", "expand"]
ATTENTION_POSITIONS: tuple[str, ...] = ("first_dw", "first_dw_or_expand", "expand")

# The four layer lists of the official SGBlock (docs/mobilenext.md has the table).
SandglassCase = Literal["first", "pointwise", "pointwise_down", "full"]


class SandglassPlan(NamedTuple):
    """What one sandglass block is made of, as the official ``SGBlock`` decides it.

    Attributes:
      case: ``'first'`` (t == 2), ``'pointwise'`` (no depthwise conv), ``'pointwise_down'``
        (no first depthwise conv, the last one at stride 2) or ``'full'``.
      hidden: width between the two 1x1 convolutions.
      first_dw: whether the block starts with a depthwise conv (stride 1).
      last_dw_stride: stride of the closing depthwise conv, 0 when there is none.
      identity: whether the input is added to the output.
    """

    case: SandglassCase
    hidden: int
    first_dw: bool
    last_dw_stride: int
    identity: bool


def sandglass_plan(inp: int, oup: int, stride: int, reduction: int, keep_3x3: bool = False) -> SandglassPlan:
    """The layers of ``SGBlock(inp, oup, stride, reduction, keep_3x3)``, by the official rules."""
    if stride not in (1, 2):
        raise ValueError(f"A sandglass block has stride 1 or 2, got {stride!r}.")
    hidden = inp // reduction
    if hidden < oup / 6:  # the official floor on the bottleneck width
        hidden = make_divisible(math.ceil(oup / 6), 16)
    if reduction == 2:
        return SandglassPlan("first", hidden, True, stride, False)
    if inp != oup and not keep_3x3:
        if stride == 1:
            return SandglassPlan("pointwise", hidden, False, 0, False)
        return SandglassPlan("pointwise_down", hidden, False, 2, False)
    if stride != 1:
        # The official block silently drops the stride here (its depthwise convs are
        # stride 1); no configuration of the paper reaches this, so refuse it.
        raise ValueError(
            f"A sandglass block with inp == oup ({inp}) or keep_3x3 has stride 1 in the official code, got "
            f"stride {stride}; change the stage's channels or stride."
        )
    return SandglassPlan("full", hidden, True, 1, not keep_3x3)


def identity_div(multiplier: float) -> int:
    """``round(1 / multiplier)``: the shortcut covers the first ``C // identity_div``
    channels. ``multiplier`` must be 1/k for a positive integer k (1, 1/2, 1/3, 1/4...)."""
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not 0 < multiplier <= 1:
        raise ValueError(
            f"identity_tensor_multiplier must be 1/k for a positive integer k (1, 1/2, 1/3, 1/4), got {multiplier!r}."
        )
    div = round(1 / multiplier)
    if abs(1 / multiplier - div) > 1e-3:
        raise ValueError(
            f"identity_tensor_multiplier must be 1/k for a positive integer k (1, 1/2, 1/3, 1/4), got "
            f"{multiplier!r}; write 1/3 for a third, not a rounded decimal."
        )
    return div


class SandglassBlock(nn.Module):
    """Sandglass block: [depthwise 3x3, BN, ReLU6] -> [attention] -> 1x1 reduce, BN (linear)
    -> 1x1 expand, BN, ReLU6 -> [depthwise 3x3 at stride, BN (linear)], plus the input on
    the first ``C * identity_tensor_multiplier`` channels where the official block adds it.

    Which bracketed parts exist is :func:`sandglass_plan`'s table. Submodules: ``dw1``,
    ``attention``, ``pw1``, ``pw2``, ``dw2``.

    Attributes:
      features: output channels.
      stride: the block's stride (taken by its last depthwise conv).
      reduction: ``t``, the input width over the bottleneck width (2 marks the first block).
      keep_3x3: keep both depthwise convs and no shortcut where the widths change (the
        official rule for the one-block, stride-1 stages).
      identity_tensor_multiplier: fraction of the channels the shortcut covers (1/k).
      attention: ``None``, ``'se'``, ``'cbam'`` or ``'ca'``.
      attention_kwargs: extra options for the attention block.
      attention_position: ``'first_dw'`` (after the first depthwise conv's BN + ReLU6;
        none in blocks without one), ``'first_dw_or_expand'`` (there, else after the
        expand conv's BN + ReLU6) or ``'expand'`` (after the expand conv in every block).
        The first block (``reduction == 2``) has none.
    """

    features: int
    stride: int
    reduction: int
    keep_3x3: bool = False
    identity_tensor_multiplier: float = 1.0
    attention: str | None = None
    attention_kwargs: Mapping[str, Any] | None = None
    attention_position: AttentionPosition = "first_dw"
    activation: ActivationLike = "relu6"
    depthwise_impl: DepthwiseImpl = "auto"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        in_channels = x.shape[-1]
        plan = sandglass_plan(in_channels, self.features, self.stride, self.reduction, self.keep_3x3)
        unit = unit_settings(self)
        linear = {**unit, "activation": None}
        attend_early, attend_late = self._attention_slots(plan)

        y = x
        if plan.first_dw:
            y = ConvBNAct(in_channels, kernel_size=3, kind="depthwise", name="dw1", **unit)(y, train)
            if attend_early:
                y = self._attention_block()(y, train)
        y = ConvBNAct(plan.hidden, kernel_size=1, kind="pointwise", name="pw1", **linear)(y, train)
        expand = ConvBNAct(self.features, kernel_size=1, kind="pointwise", name="pw2", **unit)
        last = None
        if plan.last_dw_stride:
            last = ConvBNAct(self.features, kernel_size=3, stride=plan.last_dw_stride, kind="depthwise", name="dw2",
                             **linear)
        if last is not None and not attend_late:
            y = last(y, train, producer=expand)  # dw2(pw2(y))
        else:
            y = expand(y, train)
            if attend_late:
                y = self._attention_block()(y, train)
            if last is not None:
                y = last(y, train)

        if plan.identity:
            # The official block adds the input to the first C // identity_div channels only.
            k = in_channels // identity_div(self.identity_tensor_multiplier)
            y = y + x if k == in_channels else jnp.concatenate([y[..., :k] + x[..., :k], y[..., k:]], axis=-1)
        return y

    @nn.nowrap
    def _attention_slots(self, plan: SandglassPlan) -> tuple[bool, bool]:
        """(after the first depthwise conv, after the expand conv) for this block."""
        # The first block works on the stem's narrow map (an SE block would squeeze its 32
        # channels to one); as MobileNetV2's t == 1 block in the CA paper, it has none.
        if self.attention is None or plan.case == "first":
            return False, False
        if self.attention_position == "first_dw":
            return plan.first_dw, False
        if self.attention_position == "first_dw_or_expand":
            return plan.first_dw, not plan.first_dw
        if self.attention_position == "expand":
            return False, True
        raise ValueError(
            f"Unknown attention_position {self.attention_position!r}; choose one of {list(ATTENTION_POSITIONS)}."
        )

    @nn.nowrap
    def _attention_block(self) -> nn.Module:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype, **(self.attention_kwargs or {}))
        return create_attention(self.attention, name="attention", **kwargs)


class BlockSpec(NamedTuple):
    """One sandglass block of a :class:`MobileNeXt`: its stage, widths, stride, ``t``,
    ``keep_3x3`` and :func:`sandglass_plan`."""

    stage: int
    in_channels: int
    out_channels: int
    stride: int
    reduction: int
    keep_3x3: bool
    plan: SandglassPlan


class MobileNeXt(Backbone):
    """MobileNeXt with an optional attention block in its sandglass blocks.

    Attributes:
      num_classes: classifier outputs (0: no classifier; ``__call__`` returns pooled features).
      width_mult: channel multiplier; channels are ``make_divisible(c * width_mult, 8)``
        (divisor 4 at width 0.1), except that the 1280 stage stays 1280 below width 1.
      stage_repeats: blocks per stage (8 entries). ``keep_3x3`` belongs to the stage (the
        table's one-block stride-1 stages, 144 and 1280), whatever its repeat count.
      identity_tensor_multiplier: fraction of the channels the shortcuts cover: 1 (the
        released model), 1/2, 1/3, 1/4 (the paper's ablation), any 1/k.
      attention: ``None``, ``'se'``, ``'cbam'`` or ``'ca'``, in every block but the first.
      attention_kwargs: extra options for the attention block (e.g. ``reduction``).
      attention_position: where the attention block goes (see :class:`SandglassBlock`
        and docs/mobilenext.md); default ``'first_dw'``, the authors' placement.
      dropout_rate: before the classifier (0.2, as released).
      activation: of the ReLU6 units.
      depthwise_impl: ``'auto'``, ``'xla'``, ``'shift'`` or ``'shift_vjp'``; parameters are
        the same whichever is used.
      in_channels: expected input channels.
      bn_momentum, bn_epsilon: BatchNorm settings, PyTorch's defaults.
      dtype, param_dtype: computation and parameter dtypes.
      eval_micro_batch: see :class:`~ca_flax.models.backbone.Backbone`.

    There is no 1x1 head conv: the last block's 1280 channels are pooled.
    ``features(x, train)`` returns the stem and each stage's last block (:meth:`feature_info`).
    """

    num_classes: int = 1000
    width_mult: float = 1.0
    stage_repeats: Sequence[int] = DEFAULT_REPEATS
    identity_tensor_multiplier: float = 1.0
    attention: str | None = None
    attention_kwargs: Mapping[str, Any] | None = None
    attention_position: AttentionPosition = "first_dw"
    dropout_rate: float = 0.2
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
        identity_div(self.identity_tensor_multiplier)  # raises on a bad value
        if self.attention_position not in ATTENTION_POSITIONS:
            raise ValueError(
                f"Unknown attention_position {self.attention_position!r}; choose one of {list(ATTENTION_POSITIONS)}."
            )

    # -- architecture arithmetic, shared with the converter and the tests -------------

    @property
    def divisor(self) -> int:
        return 4 if self.width_mult == 0.1 else 8

    @property
    def stem_width(self) -> int:
        return make_divisible(32 * self.width_mult, self.divisor)

    @nn.nowrap
    def stage_width(self, channels: int) -> int:
        """A stage's output width at this ``width_mult`` (the 1280 stage never narrows)."""
        if channels == 1280 and self.width_mult < 1.0:
            return 1280
        return make_divisible(channels * self.width_mult, self.divisor)

    @property
    def num_features(self) -> int:
        """Width of the pooled features (the last stage's)."""
        return self.stage_width(STAGES[-1][1])

    @nn.nowrap
    def block_specs(self) -> list[BlockSpec]:
        """Every sandglass block, in order."""
        specs, inp = [], self.stem_width
        for stage, ((t, c, n, s), repeats) in enumerate(zip(STAGES, self.stage_repeats)):
            out = self.stage_width(c)
            for i in range(repeats):
                stride, keep = (s, n == 1 and s == 1) if i == 0 else (1, False)
                specs.append(BlockSpec(stage, inp, out, stride, t, keep, sandglass_plan(inp, out, stride, t, keep)))
                inp = out
        return specs

    # -- network ----------------------------------------------------------------------

    def setup(self) -> None:
        unit = unit_settings(self)
        self.stem = ConvBNAct(self.stem_width, kernel_size=3, stride=2, kind="full", **unit)
        self.blocks = [
            SandglassBlock(
                spec.out_channels, spec.stride, spec.reduction, spec.keep_3x3,
                identity_tensor_multiplier=self.identity_tensor_multiplier, attention=self.attention,
                attention_kwargs=self.attention_kwargs, attention_position=self.attention_position, **unit,
            )
            for spec in self.block_specs()
        ]
        self.dropout = nn.Dropout(self.dropout_rate)
        if self.num_classes:
            self.classifier = nn.Dense(
                self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=dense_kernel_init
            )

    @nn.nowrap
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The stem and each stage's last block; ``stage7`` (stride 32) is pooled."""
        info, stride = {"stem": FeatureInfo("stem", 2, self.stem_width)}, 2
        for spec in self.block_specs():
            stride *= spec.stride
            info[f"stage{spec.stage}"] = FeatureInfo(f"stage{spec.stage}", stride, spec.out_channels)
        return tuple(info.values())

    def forward_features(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        maps = {"stem": self.stem(x, train)}
        y = maps["stem"]
        specs = self.block_specs()
        for i, (block, spec) in enumerate(zip(self.blocks, specs)):
            y = block(y, train)
            if i + 1 == len(specs) or specs[i + 1].stage != spec.stage:
                maps[f"stage{spec.stage}"] = y
        return maps

    def forward_head(self, x: jax.Array, train: bool) -> jax.Array:
        y = mean_pool(x, axis=(1, 2))
        if not self.num_classes:
            return y
        y = self.dropout(y, deterministic=not train)
        return self.classifier(y)


__all__ = [
    "ATTENTION_POSITIONS",
    "DEFAULT_REPEATS",
    "STAGES",
    "BlockSpec",
    "MobileNeXt",
    "SandglassBlock",
    "SandglassPlan",
    "identity_div",
    "sandglass_plan",
]
