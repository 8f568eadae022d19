"""``from_torch`` and ``to_torch``: PyTorch weights to ca-flax and back, for every
registered family (``ca_flax/convert/layouts.py``; MobileNetV2 is ``mobilenetv2.py``)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ca_flax.checkpoints import CheckpointError, abstract_variables, variables_mismatch
from ca_flax.convert.errors import ConversionError
from ca_flax.convert.io import Source, load_state_dict
from ca_flax.convert.layouts import (
    ModuleMap,
    TensorMap,
    apply_aliases,
    detect_layout,
    family_of_layout,
    get_layout,
    tensor_map,
    to_flax,
    to_torch_array,
    torch_shape,
)
from ca_flax.layers.conv import dense_kernel_init

# How many offending keys or modules an error message lists before "and N more".
_LIST_LIMIT = 8


@dataclass
class ConversionReport:
    """What :func:`from_torch` did.

    Attributes:
      source: the file path, or 'in-memory state dict'.
      layout: the layout read: 'official', 'torchvision' or 'timm' for MobileNetV2,
        'official_mnext' for MobileNeXt.
      config: the inferred module configuration (as built).
      mapped: ``(torch key, ca-flax variable path)`` of every converted tensor.
      ignored: ``(torch key, reason)`` of every tensor left out.
      notes: everything else worth knowing (wrappers, prefixes, upcasts, new head).
      num_batches_tracked: the BatchNorm batch counter of the file (largest value), so an
        export can write it back (:func:`to_torch`'s ``num_batches_tracked``).
      architecture: the ca-flax module class built, by name.
    """

    source: str
    layout: str
    config: dict[str, Any]
    mapped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    num_batches_tracked: int = 0
    architecture: str = "MobileNetV2"

    def summary(self) -> str:
        """A few human-readable lines."""
        config = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if v is not None)
        lines = [
            f"{self.source}: {self.layout} layout -> {self.architecture}({config})",
            f"  mapped {len(self.mapped)} tensors; ignored {len(self.ignored)}",
        ]
        reasons: dict[str, int] = defaultdict(int)
        for _, reason in self.ignored:
            reasons[reason] += 1
        lines += [f"  ignored {n} x: {reason}" for reason, n in reasons.items()]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly provenance (no per-tensor lists)."""
        return {
            "source": self.source,
            "layout": self.layout,
            "mapped": len(self.mapped),
            "ignored": sorted({reason for _, reason in self.ignored}),
            "notes": list(self.notes),
            "num_batches_tracked": self.num_batches_tracked,
        }


def from_torch(
    source: Source,
    *,
    layout: str = "auto",
    num_classes: int | None = None,
    strict: bool = True,
    use_ema: bool = True,
) -> tuple[Any, dict[str, Any], ConversionReport]:
    """Converts PyTorch weights of a registered family (MobileNetV2, MobileNeXt) into a ca-flax model
    and its variables.

    Args:
      source: a checkpoint path (``.pth``, ``.pt``, ``.bin``, ``.pth.tar``, ``.safetensors``, ``.npz``)
        or a state dict (tensors or numpy arrays), optionally wrapped in
        ``{'state_dict': ...}``, ``{'model': ...}`` or ``{'state_dict_ema': ...}``, with
        ``module.`` / ``_orig_mod.`` prefixes.
      layout: ``'auto'`` (detected from the keys), ``'official'`` (the authors'
        MobileNetV2+CA), ``'torchvision'``, ``'timm'`` or ``'official_mnext'`` (the authors' MobileNeXt).
      num_classes: classifier size of the returned model; ``None`` keeps the
        checkpoint's. Another value keeps everything but the classifier, which is
        initialized afresh (0 drops it: the model returns pooled features).
      strict: refuse keys the layout does not know. With ``strict=False`` they are
        ignored and listed in the report. Missing weights are always an error.
      use_ema: take the EMA weights when a checkpoint holds both.

    Returns:
      ``(model, variables, report)``: the module (a ``MobileNetV2``, or a ``MobileNeXt`` for ``'official_mnext'``),
      its ``{'params', 'batch_stats'}`` and a :class:`ConversionReport`.

    Raises:
      ConversionError: bad or unsupported input; the message names the file and the problem.
    """
    loaded = load_state_dict(source, use_ema=use_ema)
    origin, arrays = loaded.origin, dict(loaded.arrays)
    chosen = detect_layout(list(arrays), origin) if layout == "auto" else get_layout(layout)
    family = family_of_layout(chosen)
    notes = loaded.notes + apply_aliases(chosen, arrays)
    config = family.infer_config(chosen, arrays, origin)
    file_classes = config["num_classes"]
    config["num_classes"] = file_classes if num_classes is None else _check_num_classes(num_classes)
    model = family.architecture(**config)
    report = ConversionReport(origin, chosen.name, dict(config), notes=notes, architecture=family.architecture.__name__)

    modules = family.module_map(chosen, model, classifier=False)
    if file_classes:
        modules.append(ModuleMap(chosen.classifier, ("classifier",), "linear"))
    model_shapes = abstract_variables(model)
    expected = {c: dict(tree) for c, tree in model_shapes.items()}
    if file_classes:  # read the file's head as it is, whatever num_classes the model gets
        expected["params"]["classifier"] = {
            "kernel": jax.ShapeDtypeStruct((family.classifier_inputs(model), file_classes), jnp.float32),
            "bias": jax.ShapeDtypeStruct((file_classes,), jnp.float32),
        }
    variables = _import_tensors(arrays, list(tensor_map(modules)), expected, report, strict)
    _fit_classifier(model, family.classifier_inputs(model), variables, file_classes, chosen.classifier, report)
    problems = variables_mismatch(model_shapes, variables)
    if problems:  # a bug, not bad input: the mapping covers the model by construction
        raise AssertionError(f"internal error, converted variables do not fit the model: {problems[:4]}")
    if not jax.config.jax_enable_x64 and any(a.dtype == np.float64 for a in jax.tree_util.tree_leaves(variables)):
        report.notes.append("float64 weights stored as float32 (jax's x64 mode is off).")
    return model, jax.tree_util.tree_map(jnp.asarray, variables), report


def infer_config(layout: str | Any, arrays: Mapping[str, np.ndarray], origin: str = "in-memory state dict") -> dict[str, Any]:
    """The module keyword arguments that reproduce the shapes of the state dict ``arrays``
    in ``layout`` (a name or a layout), by the layout's family."""
    chosen = get_layout(layout) if isinstance(layout, str) else layout
    return family_of_layout(chosen).infer_config(chosen, arrays, origin)


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ConversionError(f"num_classes must be a non-negative integer or None, got {num_classes!r}.")
    return num_classes


def _lookup(tree: Mapping[str, Any], collection: str, path: Sequence[str]) -> Any:
    node: Any = tree[collection]
    for name in path:
        node = node[name]
    return node


def _import_tensors(
    arrays: Mapping[str, np.ndarray],
    tensors: list[TensorMap],
    expected: Mapping[str, Any],
    report: ConversionReport,
    strict: bool,
) -> dict[str, Any]:
    """Moves every mapped tensor into a nested variables dict, checking presence and
    shapes; collects all problems before raising so one message lists them."""
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    missing: list[str] = []
    mismatched: list[str] = []
    counters = []
    for t in tensors:
        if t.collection is None:  # num_batches_tracked: optional, not kept
            if t.key in arrays:
                counters.append(int(np.max(arrays[t.key], initial=0)))
                report.ignored.append((t.key, "BatchNorm batch counter; ca-flax keeps no counter"))
            continue
        if t.key not in arrays:
            missing.append(t.key)
            continue
        want = torch_shape(t.transform, _lookup(expected, t.collection, t.path).shape)
        array = arrays[t.key]
        if tuple(array.shape) != want:
            mismatched.append(f"{t.key}: expected {want}, found {tuple(array.shape)}")
            continue
        node = variables[t.collection]
        for name in t.path[:-1]:
            node = node.setdefault(name, {})
        node[t.path[-1]] = to_flax(t.transform, array)
        report.mapped.append((t.key, "/".join((t.collection,) + t.path)))
    report.num_batches_tracked = max(counters, default=0)
    known = {t.key for t in tensors}
    unexpected = [k for k in arrays if k not in known]
    if missing or mismatched or (unexpected and strict):
        raise ConversionError(_key_problems(report, missing, mismatched, unexpected if strict else []))
    report.ignored += [(k, "not part of the layout (strict=False)") for k in unexpected]
    return variables


def _group(keys: Sequence[str]) -> str:
    """``features.3.conv.1 (weight, bias), ...``: keys grouped by their module."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        groups.setdefault(module or key, []).append(leaf)
    items = [f"{m} ({', '.join(leaves)})" for m, leaves in groups.items()]
    more = f" and {len(items) - _LIST_LIMIT} more modules" if len(items) > _LIST_LIMIT else ""
    return "; ".join(items[:_LIST_LIMIT]) + more


def _key_problems(report: ConversionReport, missing: list[str], mismatched: list[str], unexpected: list[str]) -> str:
    config = ", ".join(f"{k}={v!r}" for k, v in report.config.items() if v is not None)
    parts = [f"{report.source}: the weights do not fit the {report.layout} layout of {report.architecture}({config})."]
    if mismatched:
        more = f" and {len(mismatched) - _LIST_LIMIT} more" if len(mismatched) > _LIST_LIMIT else ""
        parts.append(f"Shape mismatch: {'; '.join(mismatched[:_LIST_LIMIT])}{more}.")
    if missing:
        parts.append(f"Missing {len(missing)} keys in: {_group(missing)}.")
    if unexpected:
        parts.append(f"Unexpected {len(unexpected)} keys in: {_group(unexpected)}.")
    parts += _hints(missing, unexpected, report.architecture)
    return " ".join(parts)


def _hints(missing: list[str], unexpected: list[str], architecture: str) -> list[str]:
    hints = []
    missing_set = set(missing)
    for key in unexpected:
        for prefix in ("module.", "_orig_mod."):
            if prefix in key and key.replace(prefix, "") in missing_set:
                hints.append(
                    f"Some keys carry a {prefix!r} prefix (e.g. {key!r}) and others do not; only a prefix on "
                    "every key is stripped, so the file mixes two models."
                )
                break
        else:
            continue
        break
    if unexpected:
        hints.append(
            "Keys from wrappers are handled ({'state_dict'|'model'|'state_dict_ema': ...}, 'module.', "
            "'_orig_mod.', 'classifier.weight'); for extra modules (e.g. an auxiliary head) pass strict=False "
            "(CLI: --no-strict) to ignore them."
        )
    if missing and not unexpected:
        hints.append(f"The file is incomplete, or from a modified {architecture}.")
    return hints


def _fit_classifier(
    model: Any, features: int, variables: dict[str, Any], file_classes: int, prefix: str, report: ConversionReport
) -> None:
    """Keeps, drops or re-initializes the classifier for the requested number of classes."""
    target = model.num_classes
    if target == file_classes:
        return
    params = variables["params"]
    if file_classes:
        params.pop("classifier")
        report.mapped = [(k, v) for k, v in report.mapped if not v.startswith("params/classifier/")]
        reason = f"classifier for {file_classes} classes, replaced (model built with num_classes={target})"
        report.ignored += [(f"{prefix}.{leaf}", reason) for leaf in ("weight", "bias")]
    if target:
        # The model's own init: N(0, 0.01) kernel, zero bias; fixed seed for reproducibility.
        kernel = dense_kernel_init(jax.random.key(0), (features, target), jnp.float32)
        params["classifier"] = {"kernel": np.asarray(kernel), "bias": np.zeros((target,), np.float32)}
        report.notes.append(
            f"classifier initialized afresh for {target} classes (N(0, 0.01) kernel, zero bias, seed 0); "
            f"the checkpoint's {'head had ' + str(file_classes) + ' classes' if file_classes else 'has no classifier'}. "
            "Everything else is converted: fine-tune from here."
        )
    else:
        report.notes.append(
            f"classifier for {file_classes} classes dropped (num_classes=0): the model returns pooled features."
        )


def to_torch(
    model: Any,
    variables: Mapping[str, Any],
    layout: str,
    *,
    num_batches_tracked: int = 0,
) -> dict[str, np.ndarray]:
    """Exports ca-flax variables as a PyTorch state dict of numpy arrays.

    The dict has exactly the keys, order, shapes and dtypes of the real module's
    ``state_dict()`` (``num_batches_tracked`` included, set to ``num_batches_tracked``;
    ca-flax does not count batches), so
    ``module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)``
    loads it. Values are bit-identical to the ones :func:`from_torch` imported.

    Args:
      model: a module of the layout's family that the layout can express; for MobileNetV2: no attention for
        ``'torchvision'``/``'timm'``, the released CA block for ``'official'``; ReLU6,
        BatchNorm epsilon 1e-5 and a classifier.
      variables: its ``{'params', 'batch_stats'}``.
      layout: ``'official'``, ``'torchvision'`` or ``'timm'``.
      num_batches_tracked: value written to every BatchNorm's batch counter (the report of
        :func:`from_torch` has the file's).
    """
    chosen = get_layout(layout)
    family = family_of_layout(chosen)
    family.check_exportable(model, chosen)
    try:
        problems = variables_mismatch(abstract_variables(model), variables)
    except (TypeError, ValueError, CheckpointError) as error:
        raise ConversionError(f"The variables are not a {{'params', 'batch_stats'}} tree: {error}") from None
    if problems:
        raise ConversionError(f"The variables do not match the model: {'; '.join(problems[:_LIST_LIMIT])}.")
    counter = np.asarray(num_batches_tracked, dtype=np.int64)
    state: dict[str, np.ndarray] = {}
    for t in tensor_map(family.module_map(chosen, model)):
        if t.collection is None:
            state[t.key] = counter.copy()
        else:
            state[t.key] = to_torch_array(t.transform, np.asarray(_lookup(variables, t.collection, t.path)))
    return state
