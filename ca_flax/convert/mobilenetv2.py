"""The MobileNetV2 family of the converter: the authors' MobileNetV2+CA
(``'official'``), ``torchvision.models.mobilenet_v2`` (``'torchvision'``) and timm's
``mobilenetv2_*`` (``'timm'``) state dicts, and :class:`~ca_flax.models.MobileNetV2`.

Layouts. A layout names, for each part of MobileNetV2, the PyTorch module prefix that
holds its weights. :func:`module_map` lays a layout over a concrete ``MobileNetV2`` and
returns one :class:`~ca_flax.convert.layouts.ModuleMap` per PyTorch module, in the
PyTorch registration order, so the exported state dict has the real module's key order.
ca-flax side (NHWC, HWIO): ``stem``, ``blocks_{i}`` (numbered flat over all stages) with
``expand``/``depthwise``/``attention``/``project``, ``head``, ``classifier``; every conv
unit is ``conv`` + ``bn``.

Configuration. :func:`infer_config` uses nothing but shapes: the number of blocks per
stage (from the keys), each block's input, hidden and output widths, the stem and head
widths, the CA block's reduced width and the classifier's size. The width multiplier is
the first of a list of usual values (then the ratios the file suggests) whose channel
rounding reproduces every block's output width; stem and head widths that the
multiplier does not give are kept as explicit overrides (timm's 110d/120d keep stem 32
and head 1280).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ca_flax.convert.errors import ConversionError
from ca_flax.convert.layouts import (
    Family, ModuleKind, ModuleMap, refuse_export, register_family, stage_runs, torch_module_reasons,
)
from ca_flax.models import STAGES, MobileNetV2
from ca_flax.models.mobilenetv2 import DEFAULT_REPEATS

# The parts of an inverted residual, in execution (and PyTorch registration) order.
BLOCK_PARTS = ("expand", "depthwise", "attention", "project")


@dataclass(frozen=True)
class Layout:
    """Where one PyTorch code base keeps each MobileNetV2 part.

    Attributes:
      name: ``'official'``, ``'torchvision'`` or ``'timm'``.
      description: the code base, for messages and reports.
      signature: keys whose joint presence identifies the layout.
      stem: (conv, bn) prefixes of the stem.
      block: prefix of block ``index`` (1-based over all blocks), or of block ``position``
        within stage ``stage``: a format string using either.
      plain_block: part -> (conv, bn) prefixes inside a block without expansion (t == 1).
      expanded_block: the same for blocks with an expand conv (t != 1).
      attention: prefix of the CA block inside an expanded block, or None.
      head: (conv, bn) prefixes of the last 1x1 conv; ``{index}`` is ``num_blocks + 1``.
      classifier: prefix of the final Linear.
      classifier_alias: another spelling of ``classifier`` some checkpoints use.
      dropout_rate: the code base's dropout before the classifier.
    """

    name: str
    description: str
    signature: tuple[str, ...]
    stem: tuple[str, str]
    block: str
    plain_block: Mapping[str, tuple[str, str]]
    expanded_block: Mapping[str, tuple[str, str]]
    attention: str | None
    head: tuple[str, str]
    classifier: str
    classifier_alias: str | None
    dropout_rate: float

    @property
    def flat_blocks(self) -> bool:
        """Blocks numbered over the whole network (``features.{i}``), not per stage."""
        return "{index}" in self.block

    def block_prefix(self, index: int, stage: int, position: int) -> str:
        return self.block.format(index=index + 1, stage=stage, position=position)

    def head_prefixes(self, num_blocks: int) -> tuple[str, str]:
        return tuple(p.format(index=num_blocks + 1) for p in self.head)  # type: ignore[return-value]

    def block_regex(self) -> re.Pattern[str]:
        """Matches a key inside a block and captures its index or (stage, position)."""
        pattern = re.escape(self.block).replace(r"\{index\}", r"(\d+)")
        pattern = pattern.replace(r"\{stage\}", r"(\d+)").replace(r"\{position\}", r"(\d+)")
        # Official/torchvision blocks are features.{i}.conv.*; the stem and torchvision's
        # head are features.{i}.{0,1}.*, so require the block's inner 'conv.' container.
        inner = r"conv\." if self.flat_blocks else ""
        return re.compile(rf"^{pattern}\.{inner}")


OFFICIAL = Layout(
    name="official",
    description="the authors' MobileNetV2 + Coordinate Attention (houqb/CoordAttention, mbv2_ca.py)",
    signature=("features.0.0.weight", "features.1.conv.0.weight", "conv.0.weight"),
    stem=("features.0.0", "features.0.1"),
    block="features.{index}",
    plain_block={"depthwise": ("conv.0", "conv.1"), "project": ("conv.3", "conv.4")},
    expanded_block={"expand": ("conv.0", "conv.1"), "depthwise": ("conv.3", "conv.4"), "project": ("conv.7", "conv.8")},
    attention="conv.6",
    head=("conv.0", "conv.1"),
    classifier="classifier.1",
    classifier_alias="classifier",
    dropout_rate=0.1,
)
TORCHVISION = Layout(
    name="torchvision",
    description="torchvision.models.mobilenet_v2",
    signature=("features.0.0.weight", "features.1.conv.0.0.weight"),
    stem=("features.0.0", "features.0.1"),
    block="features.{index}",
    plain_block={"depthwise": ("conv.0.0", "conv.0.1"), "project": ("conv.1", "conv.2")},
    expanded_block={"expand": ("conv.0.0", "conv.0.1"), "depthwise": ("conv.1.0", "conv.1.1"), "project": ("conv.2", "conv.3")},
    attention=None,
    head=("features.{index}.0", "features.{index}.1"),
    classifier="classifier.1",
    classifier_alias="classifier",
    dropout_rate=0.2,
)
TIMM = Layout(
    name="timm",
    description="timm's mobilenetv2_* (EfficientNet builder)",
    signature=("conv_stem.weight", "blocks.0.0.conv_dw.weight", "conv_head.weight"),
    stem=("conv_stem", "bn1"),
    block="blocks.{stage}.{position}",
    plain_block={"depthwise": ("conv_dw", "bn1"), "project": ("conv_pw", "bn2")},
    expanded_block={"expand": ("conv_pw", "bn1"), "depthwise": ("conv_dw", "bn2"), "project": ("conv_pwl", "bn3")},
    attention=None,
    head=("conv_head", "bn2"),
    classifier="classifier",
    classifier_alias=None,
    dropout_rate=0.0,
)
# Official CA block: torch submodule -> (ca-flax submodule, kind).
_CA_PARTS: tuple[tuple[str, str, ModuleKind], ...] = (
    ("conv1", "reduce", "conv_bias"),
    ("bn1", "bn", "bn"),
    ("conv2", "gate_h", "conv_bias"),
    ("conv3", "gate_w", "conv_bias"),
)


def module_map(layout: Layout, model: MobileNetV2, *, classifier: bool = True) -> list[ModuleMap]:
    """Every PyTorch module of ``layout`` for ``model``, in registration order."""
    if layout.attention is None and model.attention is not None:
        raise ConversionError(
            f"The {layout.name} layout has no attention blocks, but the model has attention={model.attention!r}; "
            f"use the 'official' layout for 'ca' models."
        )
    if layout.attention is not None and model.attention != "ca":
        raise ConversionError(
            f"The {layout.name} layout is MobileNetV2 with Coordinate Attention, but the model has "
            f"attention={model.attention!r}; export plain MobileNetV2 models as 'torchvision' or 'timm'."
        )
    mods = [ModuleMap(layout.stem[0], ("stem", "conv"), "conv"), ModuleMap(layout.stem[1], ("stem", "bn"), "bn")]
    position = {}
    specs = model.block_specs()
    for i, (stage, _, _, expansion) in enumerate(specs):
        position[stage] = position.get(stage, -1) + 1
        prefix = layout.block_prefix(i, stage, position[stage])
        parts = layout.plain_block if expansion == 1 else layout.expanded_block
        for part in BLOCK_PARTS:
            if part == "attention":
                if expansion != 1 and layout.attention is not None:
                    for torch_name, flax_name, kind in _CA_PARTS:
                        mods.append(
                            ModuleMap(f"{prefix}.{layout.attention}.{torch_name}", (f"blocks_{i}", "attention", flax_name), kind)
                        )
            elif part in parts:
                conv, bn = parts[part]
                mods.append(ModuleMap(f"{prefix}.{conv}", (f"blocks_{i}", part, "conv"), "conv"))
                mods.append(ModuleMap(f"{prefix}.{bn}", (f"blocks_{i}", part, "bn"), "bn"))
    head_conv, head_bn = layout.head_prefixes(len(specs))
    mods += [ModuleMap(head_conv, ("head", "conv"), "conv"), ModuleMap(head_bn, ("head", "bn"), "bn")]
    if classifier:
        mods.append(ModuleMap(layout.classifier, ("classifier",), "linear"))
    return mods



# -- configuration from shapes --------------------------------------------------------

# Tried first, in this order, so a file gets the width it was made with (1.0, not 1.02).
USUAL_WIDTHS = (1.0, 0.5, 0.75, 1.4, 0.35, 1.3, 1.2, 1.1, 0.25, 0.1, 1.5, 2.0)
# The released CA block: mip = max(8, C // 32).
CA_REDUCTION, CA_MIN_CHANNELS = 32, 8


@dataclass(frozen=True)
class BlockShape:
    """What the state dict says about one inverted residual."""

    prefix: str
    stage: int | None  # known from the keys in timm's layout only
    expanded: bool
    hidden: int
    out_channels: int
    mip: int | None  # CA reduced width, official layout only


def infer_config(layout: Layout, arrays: Mapping[str, np.ndarray], origin: str) -> dict[str, Any]:
    """``MobileNetV2`` keyword arguments that reproduce the shapes in ``arrays``.

    ``num_classes`` is 0 when the state dict has no classifier (a backbone). Each width
    is read from the conv weight or, if that is missing, its BatchNorm, so that a
    partial file reaches the full list of missing keys instead of failing here.
    """
    stem_conv, stem_bn = layout.stem
    stem = _dim(arrays, origin, (f"{stem_conv}.weight", 0), (f"{stem_bn}.weight", 0))
    in_channels = _dim(arrays, origin, (f"{stem_conv}.weight", 1), default=3)
    blocks = read_blocks(layout, arrays, origin)
    repeats = _stage_repeats(blocks, origin)
    head_conv, head_bn = layout.head_prefixes(len(blocks))
    classifier = f"{layout.classifier}.weight"
    head = _dim(arrays, origin, (f"{head_conv}.weight", 0), (f"{head_bn}.weight", 0), (classifier, 1))
    num_classes = _dim(arrays, origin, (classifier, 0), default=0)
    width = _width(blocks, repeats, stem, head, origin)
    probe = MobileNetV2(width_mult=width, stage_repeats=repeats)
    reduction = _ca_reduction(blocks, origin) if layout.attention is not None else CA_REDUCTION
    return {
        "num_classes": num_classes,
        "width_mult": width,
        "stage_repeats": repeats,
        "stem_channels": None if probe.stem_width == stem else stem,
        "head_channels": None if probe.head_width == head else head,
        "attention": "ca" if layout.attention is not None else None,
        "attention_kwargs": None if reduction == CA_REDUCTION else {"reduction": reduction},
        "dropout_rate": layout.dropout_rate,
        "in_channels": in_channels,
    }


def _dim(
    arrays: Mapping[str, np.ndarray], origin: str, *candidates: tuple[str, int], default: int | None = None
) -> int:
    """Size of axis ``axis`` of the first present ``key`` among ``candidates``."""
    for key, axis in candidates:
        if key in arrays and arrays[key].ndim > axis:
            return int(arrays[key].shape[axis])
    if default is not None:
        return default
    raise ConversionError(
        f"{origin}: missing {candidates[0][0]!r}, needed to infer the model configuration."
    )


def _block_prefixes(layout: Layout, keys: Sequence[str], origin: str) -> list[tuple[str, int | None]]:
    """(prefix, stage) of every block, in order, checking the numbering has no gaps."""
    regex = layout.block_regex()
    found = {tuple(int(g) for g in m.groups()) for m in map(regex.match, keys) if m}
    if not found:
        raise ConversionError(f"{origin}: no inverted-residual blocks found ({layout.block}.* keys).")
    if layout.flat_blocks:
        indices = sorted(i for (i,) in found)
        if indices != list(range(1, len(indices) + 1)):
            gap = next(i for i in range(1, indices[-1] + 1) if i not in indices)
            raise ConversionError(f"{origin}: blocks are not numbered consecutively: {layout.block.format(index=gap)} is missing.")
        return [(layout.block.format(index=i), None) for i in indices]
    stages: dict[int, list[int]] = {}
    for stage, position in found:
        stages.setdefault(stage, []).append(position)
    if sorted(stages) != list(range(len(STAGES))):
        raise ConversionError(
            f"{origin}: expected {len(STAGES)} stages of blocks (blocks.0 to blocks.{len(STAGES) - 1}), "
            f"found blocks.{sorted(stages)}."
        )
    prefixes = []
    for stage in sorted(stages):
        positions = sorted(stages[stage])
        if positions != list(range(len(positions))):
            raise ConversionError(f"{origin}: the blocks of stage {stage} are not numbered 0..{len(positions) - 1}.")
        prefixes += [(layout.block.format(stage=stage, position=p), stage) for p in positions]
    return prefixes


def read_blocks(layout: Layout, arrays: Mapping[str, np.ndarray], origin: str) -> list[BlockShape]:
    """The widths of every block, read off its conv (or BatchNorm) weights."""
    blocks = []
    expanded_conv, expanded_bn = layout.expanded_block["project"]
    for prefix, stage in _block_prefixes(layout, list(arrays), origin):
        # Only expanded blocks have these; in torchvision's t == 1 block the conv key is
        # a BatchNorm's (1-d), hence the rank check.
        conv = arrays.get(f"{prefix}.{expanded_conv}.weight")
        expanded = (conv is not None and conv.ndim == 4) or f"{prefix}.{expanded_bn}.weight" in arrays
        parts = layout.expanded_block if expanded else layout.plain_block
        (dw_conv, dw_bn), (pw_conv, pw_bn) = parts["depthwise"], parts["project"]
        hidden = _dim(arrays, origin, (f"{prefix}.{dw_conv}.weight", 0), (f"{prefix}.{dw_bn}.weight", 0))
        out = _dim(arrays, origin, (f"{prefix}.{pw_conv}.weight", 0), (f"{prefix}.{pw_bn}.weight", 0))
        mip = None
        if layout.attention is not None and expanded:
            ca = f"{prefix}.{layout.attention}"
            mip = _dim(arrays, origin, (f"{ca}.conv1.weight", 0), (f"{ca}.bn1.weight", 0), (f"{ca}.conv2.weight", 1))
        blocks.append(BlockShape(prefix, stage, expanded, hidden, out, mip))
    return blocks


def _stage_repeats(blocks: Sequence[BlockShape], origin: str) -> tuple[int, ...]:
    if blocks[0].stage is not None:
        return tuple(sum(1 for b in blocks if b.stage == s) for s in range(len(STAGES)))
    return stage_runs([b.out_channels for b in blocks], DEFAULT_REPEATS, origin)


def _width_candidates(blocks: Sequence[BlockShape], repeats: Sequence[int]) -> list[float]:
    ends = np.cumsum(repeats) - 1
    ratios = [round(blocks[e].out_channels / c, 2) for e, (_, c, _, _) in zip(ends, STAGES)]
    candidates = list(USUAL_WIDTHS) + sorted(set(ratios), key=ratios.index)
    return [w for i, w in enumerate(candidates) if w > 0 and w not in candidates[:i]]


def _width(blocks: Sequence[BlockShape], repeats: tuple[int, ...], stem: int, head: int, origin: str) -> float:
    """The width multiplier whose rounding gives every block's output width; among those,
    the one that also gives the stem and head widths, if any."""
    outs = [b.out_channels for b in blocks]
    best: tuple[int, float] | None = None
    closest: list[str] | None = None  # for the error: the width with the fewest odd blocks
    for width in _width_candidates(blocks, repeats):
        model = MobileNetV2(width_mult=width, stage_repeats=repeats)
        expected = [out for _, out, _, _ in model.block_specs()]
        if expected != outs:
            odd = [
                f"{b.prefix} outputs {b.out_channels} channels where width {width} gives {e}"
                for b, e in zip(blocks, expected)
                if b.out_channels != e
            ]
            if closest is None or len(odd) < len(closest):
                closest = odd
            continue
        score = (model.stem_width == stem) + (model.head_width == head)
        if score == 2:
            return width
        if best is None or score > best[0]:
            best = (score, width)
    if best is None:
        detail = f" Closest: {'; '.join(closest[:3])}." if closest else ""
        raise ConversionError(
            f"{origin}: no width multiplier gives the block output widths {outs} (MobileNetV2 rounds "
            f"c * width to multiples of 8); this is not a standard MobileNetV2.{detail}"
        )
    return best[1]


def _ca_reduction(blocks: Sequence[BlockShape], origin: str) -> int:
    """The CA reduction that gives every block's reduced width: 32 in the released model."""
    pairs = [(b.hidden, b.mip) for b in blocks if b.mip is not None]
    for reduction in [CA_REDUCTION] + list(range(1, max(h for h, _ in pairs) + 1)):
        if all(max(CA_MIN_CHANNELS, h // reduction) == mip for h, mip in pairs):
            return reduction
    raise ConversionError(
        f"{origin}: the Coordinate Attention reduced widths {[m for _, m in pairs]} (for block widths "
        f"{[h for h, _ in pairs]}) match no reduction ratio with mip = max(8, C // reduction)."
    )


# -- export ----------------------------------------------------------------------------


def check_exportable(model: Any, layout: Layout) -> None:
    """Raises ConversionError when ``model`` cannot be written in ``layout``."""
    if not isinstance(model, MobileNetV2):
        raise ConversionError(f"to_torch exports ca-flax MobileNetV2 models, got a {type(model).__name__}.")
    reasons = torch_module_reasons(model)
    if model.attention == "ca" and set(model.attention_kwargs or {}) - {"reduction"}:
        reasons.append(f"CA options {dict(model.attention_kwargs or {})} (the released block only varies the reduction)")
    refuse_export(layout, reasons)


register_family(Family(
    name="mobilenetv2",
    architecture=MobileNetV2,
    description="the authors' MobileNetV2+CA, torchvision's or timm's MobileNetV2",
    layouts=(OFFICIAL, TORCHVISION, TIMM),
    infer_config=infer_config,
    module_map=module_map,
    check_exportable=check_exportable,
    classifier_inputs=lambda model: model.head_width,
))
