"""The three PyTorch state-dict layouts and how their keys map onto ca-flax variables.

A layout names, for each part of MobileNetV2, the PyTorch module prefix that holds its
weights. :func:`module_map` lays a layout over a concrete :class:`MobileNetV2` and
returns one :class:`ModuleMap` per PyTorch module, in the PyTorch registration order, so
the exported state dict has the real module's key order. :func:`tensor_map` expands
those into single tensors with their layout transforms.

ca-flax side (NHWC, HWIO): ``stem``, ``blocks_{i}`` (numbered flat over all stages) with
``expand``/``depthwise``/``attention``/``project``, ``head``, ``classifier``; every conv
unit is ``conv`` + ``bn``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Literal, Mapping, Sequence

import numpy as np

from ca_flax.convert.errors import ConversionError
from ca_flax.models import MobileNetV2

ModuleKind = Literal["conv", "conv_bias", "bn", "linear"]
Transform = Literal["conv", "linear", "none"]
# The parts of an inverted residual, in execution (and PyTorch registration) order.
BLOCK_PARTS = ("expand", "depthwise", "attention", "project")
NUM_BATCHES_TRACKED = "num_batches_tracked"


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
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (OFFICIAL, TORCHVISION, TIMM)}

# Official CA block: torch submodule -> (ca-flax submodule, kind).
_CA_PARTS: tuple[tuple[str, str, ModuleKind], ...] = (
    ("conv1", "reduce", "conv_bias"),
    ("bn1", "bn", "bn"),
    ("conv2", "gate_h", "conv_bias"),
    ("conv3", "gate_w", "conv_bias"),
)


def get_layout(name: str) -> Layout:
    """The layout called ``name``, or a ConversionError listing the known ones."""
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise ConversionError(f"Unknown layout {name!r}; choose 'auto' or one of {', '.join(LAYOUTS)}.") from None


def detect_layout(keys: Sequence[str], origin: str) -> Layout:
    """The layout whose signature keys are all present in ``keys``."""
    present = set(keys)
    found = [layout for layout in LAYOUTS.values() if all(k in present for k in layout.signature)]
    if len(found) == 1:
        return found[0]
    looked_for = "; ".join(f"{layout.name}: {', '.join(layout.signature)}" for layout in LAYOUTS.values())
    first = list(keys)[:8]
    hint = _foreign_prefix_hint(keys)
    raise ConversionError(
        f"{origin}: unknown state-dict layout: not the authors' MobileNetV2+CA, torchvision's or timm's "
        f"MobileNetV2. Looked for the signature keys {looked_for}. The first keys found are "
        f"{', '.join(map(repr, first))}{' ...' if len(keys) > len(first) else ''} ({len(keys)} in all).{hint}"
    )


def _foreign_prefix_hint(keys: Sequence[str]) -> str:
    """A hint when every key sits under one unknown prefix (e.g. a detector's 'backbone.')."""
    heads = {k.split(".", 1)[0] for k in keys}
    if len(keys) > 1 and len(heads) == 1 and all("." in k for k in keys):
        prefix = next(iter(heads)) + "."
        return (
            f" Every key starts with {prefix!r}: if this is a larger model around a MobileNetV2, pass the "
            f"sub-dict {{k[len({prefix!r}):]: v for k, v in sd.items() if k.startswith({prefix!r})}}."
        )
    return ""


def apply_aliases(layout: Layout, arrays: dict[str, np.ndarray]) -> list[str]:
    """Renames ``classifier.weight`` to ``classifier.1.weight`` (and the bias) where the
    layout expects the latter; returns notes on what was renamed."""
    alias = layout.classifier_alias
    if alias is None:
        return []
    notes = []
    for leaf in ("weight", "bias"):
        old, new = f"{alias}.{leaf}", f"{layout.classifier}.{leaf}"
        if old in arrays and new not in arrays:
            arrays[new] = arrays.pop(old)
            notes.append(f"read {old!r} as {new!r} (the head saved without its Dropout container).")
    return notes


# -- mapping ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleMap:
    """One PyTorch module (``torch_prefix``) and the ca-flax module it becomes."""

    torch_prefix: str
    flax_path: tuple[str, ...]
    kind: ModuleKind


@dataclass(frozen=True)
class TensorMap:
    """One PyTorch tensor: its key, its ca-flax variable (collection, path) and the
    transform between them. ``collection`` is None for buffers ca-flax does not keep
    (``num_batches_tracked``)."""

    key: str
    collection: str | None
    path: tuple[str, ...]
    transform: Transform
    module: ModuleMap


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


def tensor_map(modules: Sequence[ModuleMap]) -> Iterator[TensorMap]:
    """The tensors of each module, in PyTorch's order within a module."""
    for m in modules:
        p = m.torch_prefix
        if m.kind == "bn":
            yield TensorMap(f"{p}.weight", "params", m.flax_path + ("scale",), "none", m)
            yield TensorMap(f"{p}.bias", "params", m.flax_path + ("bias",), "none", m)
            yield TensorMap(f"{p}.running_mean", "batch_stats", m.flax_path + ("mean",), "none", m)
            yield TensorMap(f"{p}.running_var", "batch_stats", m.flax_path + ("var",), "none", m)
            yield TensorMap(f"{p}.{NUM_BATCHES_TRACKED}", None, (), "none", m)
        else:
            yield TensorMap(f"{p}.weight", "params", m.flax_path + ("kernel",), "linear" if m.kind == "linear" else "conv", m)
            if m.kind != "conv":
                yield TensorMap(f"{p}.bias", "params", m.flax_path + ("bias",), "none", m)


# -- transforms ------------------------------------------------------------------------

# torch conv (O, I, kh, kw) -> HWIO (kh, kw, I, O); depthwise (C, 1, k, k) -> (k, k, 1, C).
_CONV_TO_FLAX = (2, 3, 1, 0)
_CONV_TO_TORCH = (3, 2, 0, 1)


def to_flax(transform: Transform, array: np.ndarray) -> np.ndarray:
    """A PyTorch tensor in ca-flax's layout (values untouched, only axes moved)."""
    if transform == "conv":
        return np.ascontiguousarray(np.transpose(array, _CONV_TO_FLAX))
    if transform == "linear":
        return np.ascontiguousarray(array.T)
    return array


def to_torch_array(transform: Transform, array: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_flax`."""
    # Fresh, writable, C-ordered copies: torch.from_numpy warns on read-only jax buffers.
    if transform == "conv":
        array = np.transpose(array, _CONV_TO_TORCH)
    elif transform == "linear":
        array = array.T
    return np.array(array, order="C", copy=True)


def torch_shape(transform: Transform, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a tensor whose ca-flax shape is ``flax_shape``."""
    if transform == "conv":
        return tuple(flax_shape[i] for i in _CONV_TO_TORCH)
    if transform == "linear":
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)
