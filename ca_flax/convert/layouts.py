"""Mapping PyTorch state dicts onto ca-flax variables, for every model family.

A *family* (:class:`Family`) is one ca-flax architecture and the PyTorch layouts of it
the converter reads and writes: it detects nothing itself, but says how to read a
configuration off a state dict's shapes and which PyTorch module becomes which ca-flax
one. ``ca_flax/convert/mobilenetv2.py`` is the MobileNetV2 family; another family is one
such module that calls :func:`register_family` (``ca_flax/convert/__init__.py`` imports
it). :func:`from_torch` and :func:`to_torch` (``api.py``) dispatch through this table.

A *layout* is any object with ``name``, ``description``, ``signature`` (keys whose joint
presence identifies it), ``classifier`` (the final Linear's prefix) and
``classifier_alias`` (another spelling of it, or None). :func:`tensor_map` expands a
family's :class:`ModuleMap` list into single tensors with their layout transforms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np

from ca_flax.convert.errors import ConversionError

ModuleKind = Literal["conv", "conv_bias", "bn", "linear"]
Transform = Literal["conv", "linear", "none"]
NUM_BATCHES_TRACKED = "num_batches_tracked"


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


@dataclass(frozen=True)
class Family:
    """One ca-flax architecture and its PyTorch layouts.

    Attributes:
      name: the family, e.g. ``'mobilenetv2'``.
      architecture: the ca-flax module class, built as ``architecture(**infer_config(...))``.
      description: its PyTorch code bases in words, for the error on an unknown layout.
      layouts: the layouts it reads and writes (names unique over all families).
      infer_config: ``(layout, arrays, origin) -> module kwargs`` from the tensor shapes;
        ``num_classes`` 0 when the state dict has no classifier.
      module_map: ``(layout, model, *, classifier=True) -> [ModuleMap]``, every PyTorch
        module of the layout for ``model`` in registration order.
      check_exportable: ``(model, layout)``; raises ConversionError when ``to_torch``
        cannot express ``model`` in ``layout``.
      classifier_inputs: ``model -> int``, the classifier's input features.
    """

    name: str
    architecture: type
    description: str
    layouts: tuple[Any, ...]
    infer_config: Callable[[Any, Mapping[str, np.ndarray], str], dict[str, Any]]
    module_map: Callable[..., list[ModuleMap]]
    check_exportable: Callable[[Any, Any], None]
    classifier_inputs: Callable[[Any], int]


FAMILIES: dict[str, Family] = {}
# Every registered family's layouts by name (what ``layout=`` and the CLI's --layout take).
LAYOUTS: dict[str, Any] = {}
_FAMILY_OF_LAYOUT: dict[str, Family] = {}


def register_family(family: Family) -> None:
    """Adds ``family`` and its layouts to the converter's table."""
    if family.name in FAMILIES:
        raise ValueError(f"Family {family.name!r} is already registered.")
    taken = [layout.name for layout in family.layouts if layout.name in LAYOUTS]
    if taken:
        raise ValueError(f"Layout name(s) {taken} of family {family.name!r} are taken by another family.")
    FAMILIES[family.name] = family
    for layout in family.layouts:
        LAYOUTS[layout.name] = layout
        _FAMILY_OF_LAYOUT[layout.name] = family


def family_of_layout(layout: Any) -> Family:
    """The family a registered layout belongs to."""
    return _FAMILY_OF_LAYOUT[layout.name]


def get_layout(name: str) -> Any:
    """The layout called ``name``, or a ConversionError listing the known ones."""
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise ConversionError(f"Unknown layout {name!r}; choose 'auto' or one of {', '.join(LAYOUTS)}.") from None


def detect_layout(keys: Sequence[str], origin: str) -> Any:
    """The layout whose signature keys are all present in ``keys``."""
    present = set(keys)
    found = [layout for layout in LAYOUTS.values() if all(k in present for k in layout.signature)]
    if len(found) == 1:
        return found[0]
    looked_for = "; ".join(f"{layout.name}: {', '.join(layout.signature)}" for layout in LAYOUTS.values())
    first = list(keys)[:8]
    hint = _foreign_prefix_hint(keys)
    families = "; nor ".join(family.description for family in FAMILIES.values())
    raise ConversionError(
        f"{origin}: unknown state-dict layout: not {families}. Looked for the signature keys {looked_for}. "
        f"The first keys found are "
        f"{', '.join(map(repr, first))}{' ...' if len(keys) > len(first) else ''} ({len(keys)} in all).{hint}"
    )


def _foreign_prefix_hint(keys: Sequence[str]) -> str:
    """A hint when every key sits under one unknown prefix (e.g. a detector's 'backbone.')."""
    heads = {k.split(".", 1)[0] for k in keys}
    if len(keys) > 1 and len(heads) == 1 and all("." in k for k in keys):
        prefix = next(iter(heads)) + "."
        return (
            f" Every key starts with {prefix!r}: if this is a larger model around a known network, pass the "
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


def stage_runs(outs: Sequence[int], default_repeats: tuple[int, ...], origin: str) -> tuple[int, ...]:
    """Blocks per stage of blocks numbered flat over the network, from their output
    widths: a stage ends where the width changes. Narrow models can round two stages to
    one width; the standard depth is the only sensible reading then."""
    runs = [1]
    for previous, out in zip(outs, outs[1:]):
        if out == previous:
            runs[-1] += 1
        else:
            runs.append(1)
    if len(runs) == len(default_repeats):
        return tuple(runs)
    if len(outs) == sum(default_repeats):
        return default_repeats
    raise ConversionError(
        f"{origin}: cannot tell the {len(default_repeats)} stages apart: {len(outs)} blocks with output widths "
        f"{list(outs)}."
    )


def torch_module_reasons(model: Any) -> list[str]:
    """Why the PyTorch modules of a MobileNet family cannot hold ``model``, if they cannot:
    they use ReLU6, BatchNorm epsilon 1e-5 and always a classifier."""
    reasons = []
    if model.activation != "relu6":
        reasons.append(f"activation {model.activation!r} (PyTorch's modules use ReLU6)")
    if model.bn_epsilon != 1e-5:
        reasons.append(f"bn_epsilon {model.bn_epsilon} (PyTorch's default is 1e-5)")
    if not model.num_classes:
        reasons.append("no classifier (num_classes=0; the PyTorch modules always have one)")
    return reasons


def refuse_export(layout: Any, reasons: Sequence[str]) -> None:
    """Raises the ConversionError of :func:`to_torch` listing ``reasons``, if any."""
    if reasons:
        raise ConversionError(
            f"The model cannot be expressed in the {layout.name} layout ({layout.description}): {'; '.join(reasons)}."
        )


# -- tensors ---------------------------------------------------------------------------


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
