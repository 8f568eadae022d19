"""The MobileNeXt family of the converter: the authors' ``mnext.py`` state dicts
(``'official_mnext'``) and :class:`~ca_flax.models.MobileNeXt`.

Layout. ``features.0.{0,1}`` is the stem (conv, BN); ``features.<i>.conv.<j>`` the
sandglass block ``blocks_{i-1}``, whose Sequential holds its convs and BatchNorms at the
positions of its case (``models/mobilenext.py``'s :func:`sandglass_plan`); ``classifier.1``
the Linear. ca-flax side: ``stem``, ``blocks_{i}`` with ``dw1``/``pw1``/``pw2``/``dw2``,
``classifier``; every conv unit is ``conv`` + ``bn``.

Configuration, from shapes only: the blocks (from the keys), each block's output width,
the stages (a stage ends where the output width changes), the stem width, the
classifier's size; the width multiplier is the first usual value whose rounding gives
every width. The shortcut fraction (``identity_tensor_multiplier``, the released
half-identity model's 1/2) is not in the weights: set it on the returned model,
``model.clone(identity_tensor_multiplier=0.5)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ca_flax.convert.errors import ConversionError
from ca_flax.convert.layouts import (
    Family, ModuleMap, refuse_export, register_family, stage_runs, torch_module_reasons,
)
from ca_flax.convert.mobilenetv2 import USUAL_WIDTHS, _dim  # the shared shape reader
from ca_flax.models.mobilenext import DEFAULT_REPEATS, STAGES, MobileNeXt


@dataclass(frozen=True)
class Layout:
    """The official MobileNeXt layout (the fields :mod:`ca_flax.convert.layouts` reads)."""

    name: str
    description: str
    signature: tuple[str, ...]
    classifier: str
    classifier_alias: str | None


OFFICIAL_MNEXT = Layout(
    name="official_mnext",
    description="the authors' MobileNeXt (zhoudaquan/rethinking_bottleneck_design, mnext.py)",
    # features.1 is the t == 2 block, whose Sequential runs to index 9; MobileNetV2's first
    # block never does.
    signature=("features.0.0.weight", "features.1.conv.9.weight"),
    classifier="classifier.1",
    classifier_alias="classifier",
)

# (part, conv index, BN index) in the block's Sequential, in registration order, per case.
_FOUR_CONVS = (("dw1", 0, 1), ("pw1", 3, 4), ("pw2", 5, 6), ("dw2", 8, 9))
BLOCK_PARTS: dict[str, tuple[tuple[str, int, int], ...]] = {
    "first": _FOUR_CONVS,
    "full": _FOUR_CONVS,
    "pointwise": (("pw1", 0, 1), ("pw2", 2, 3)),
    "pointwise_down": (("pw1", 0, 1), ("pw2", 2, 3), ("dw2", 5, 6)),
}
_BLOCK_KEY = re.compile(r"^features\.(\d+)\.conv\.")


def module_map(layout: Layout, model: MobileNeXt, *, classifier: bool = True) -> list[ModuleMap]:
    """Every PyTorch module of the official layout for ``model``, in registration order."""
    if model.attention is not None:
        raise ConversionError(
            f"The {layout.name} layout has no attention blocks, but the model has attention={model.attention!r}; "
            "only plain MobileNeXt models convert to and from the authors' code."
        )
    mods = [ModuleMap("features.0.0", ("stem", "conv"), "conv"), ModuleMap("features.0.1", ("stem", "bn"), "bn")]
    for i, spec in enumerate(model.block_specs()):
        for part, conv, bn in BLOCK_PARTS[spec.plan.case]:
            mods.append(ModuleMap(f"features.{i + 1}.conv.{conv}", (f"blocks_{i}", part, "conv"), "conv"))
            mods.append(ModuleMap(f"features.{i + 1}.conv.{bn}", (f"blocks_{i}", part, "bn"), "bn"))
    if classifier:
        mods.append(ModuleMap(layout.classifier, ("classifier",), "linear"))
    return mods


def _block_outputs(arrays: Mapping[str, np.ndarray], origin: str) -> list[int]:
    """Output width of every block (its second 1x1 conv's), checking the numbering."""
    indices = sorted({int(m.group(1)) for m in map(_BLOCK_KEY.match, arrays) if m})
    if not indices:
        raise ConversionError(f"{origin}: no sandglass blocks found (features.<i>.conv.* keys).")
    if indices != list(range(1, len(indices) + 1)):
        gap = next(i for i in range(1, indices[-1] + 1) if i not in indices)
        raise ConversionError(f"{origin}: blocks are not numbered consecutively: features.{gap} is missing.")
    outs = []
    for i in indices:
        p = f"features.{i}.conv"
        four = any(f"{p}.{j}.weight" in arrays for j in (8, 9))  # first / full case: pw2 at 5
        outs.append(_dim(arrays, origin, *(((f"{p}.5.weight", 0), (f"{p}.6.weight", 0)) if four
                                         else ((f"{p}.2.weight", 0), (f"{p}.3.weight", 0)))))
    return outs


def infer_config(layout: Layout, arrays: Mapping[str, np.ndarray], origin: str) -> dict[str, Any]:
    """``MobileNeXt`` keyword arguments that reproduce the shapes in ``arrays``
    (``num_classes`` 0 when there is no classifier)."""
    stem = _dim(arrays, origin, ("features.0.0.weight", 0), ("features.0.1.weight", 0))
    in_channels = _dim(arrays, origin, ("features.0.0.weight", 1), default=3)
    outs = _block_outputs(arrays, origin)
    repeats = stage_runs(outs, DEFAULT_REPEATS, origin)
    num_classes = _dim(arrays, origin, (f"{layout.classifier}.weight", 0), default=0)
    ends = np.cumsum(repeats) - 1
    ratios = [round(outs[e] / c, 2) for e, (_, c, _, _) in zip(ends, STAGES) if c != 1280]
    candidates = list(dict.fromkeys(list(USUAL_WIDTHS) + [r for r in ratios if r > 0]))
    for width in candidates:
        probe = MobileNeXt(width_mult=width, stage_repeats=repeats)
        try:
            expected = [spec.out_channels for spec in probe.block_specs()]
        except ValueError:  # a width at which two stages round alike: not this one
            continue
        if expected == list(outs) and probe.stem_width == stem:
            return {
                "num_classes": num_classes, "width_mult": width, "stage_repeats": repeats,
                "dropout_rate": 0.2, "in_channels": in_channels,
            }
    raise ConversionError(
        f"{origin}: no width multiplier gives the stem width {stem} and block output widths {list(outs)} "
        "(MobileNeXt rounds c * width to multiples of 8 and keeps the 1280 stage below width 1); this is "
        "not a standard MobileNeXt."
    )


def check_exportable(model: Any, layout: Layout) -> None:
    """Raises ConversionError when ``model`` cannot be written in the official layout."""
    if not isinstance(model, MobileNeXt):
        raise ConversionError(f"The {layout.name} layout takes ca-flax MobileNeXt models, got a {type(model).__name__}.")
    reasons = torch_module_reasons(model)
    if model.attention is not None:
        reasons.insert(0, f"attention={model.attention!r} (the authors' MobileNeXt has none)")
    refuse_export(layout, reasons)


register_family(Family(
    name="mobilenext",
    architecture=MobileNeXt,
    description="the authors' MobileNeXt",
    layouts=(OFFICIAL_MNEXT,),
    infer_config=infer_config,
    module_map=module_map,
    check_exportable=check_exportable,
    classifier_inputs=lambda model: model.num_features,
))
