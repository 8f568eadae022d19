"""Export a model to a LiteRT (``.tflite``) or ONNX (``.onnx``) file, checked in its runtime.

>>> report = export_tflite(model, variables, "mbv2_ca.tflite", image_size=224)
>>> report["verification"]["relative_error"]            # float32 logits vs model.apply

Each export writes ``OUTPUT`` and the sidecar ``OUTPUT.json`` (input shape and
normalization, class count and labels, source checkpoint and its sha256, the
verification figures). Both are written to temporary files in the output's directory,
verified there, and renamed into place only when complete and verified, so a failed or
interrupted export never leaves a partial or unverified ``OUTPUT``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn

from ca_flax.data.config import MEAN_RGB, STDDEV_RGB
from ca_flax.export.graph import ExportError, check_image_size

FORMATS = {".tflite": "litert", ".onnx": "onnx"}
SIDECAR_FORMAT = "ca-flax-export"
SIDECAR_VERSION = 1
# Float32 logits must match model.apply within this fraction of the largest |logit|.
TOLERANCE = 1e-4
VERIFY_BATCHES = 3
QUANTIZE = ("int8",)
SHA256_DEFINITION = (
    "sha256 of the lines '<sha256 of file>  <path>\\n' (sha256sum's format), one per file of the checkpoint "
    "(model.json and variables/ of a model checkpoint; model.json and checkpoints/<step>/ of a training workdir), "
    "paths relative to the checkpoint directory, sorted bytewise: "
    "cd CHECKPOINT && find model.json variables -type f | LC_ALL=C sort | xargs sha256sum | sha256sum"
)


class VerificationError(RuntimeError):
    """The exported file does not compute what the model does (nothing was written)."""


# -- the checkpoint's identity ----------------------------------------------------------


def checkpoint_files(path: str | os.PathLike[str], step: int | None = None) -> list[str]:
    """The files that make up the checkpoint at ``path`` (relative POSIX paths, sorted):
    ``model.json`` and ``variables/`` for a model checkpoint, ``model.json`` and
    ``checkpoints/<step>/`` for a training workdir (``step``: the one exported)."""
    root = Path(path)
    parts = ["variables"] if (root / "variables").is_dir() else [f"checkpoints/{step}"]
    files = ["model.json"] if (root / "model.json").is_file() else []
    for part in parts:
        files += [p.relative_to(root).as_posix() for p in (root / part).rglob("*") if p.is_file()]
    return sorted(files, key=lambda name: name.encode())


def checkpoint_sha256(path: str | os.PathLike[str], step: int | None = None) -> str:
    """The checkpoint's sha256, as :data:`SHA256_DEFINITION` defines it."""
    digest = hashlib.sha256()
    for name in checkpoint_files(path, step):
        digest.update(f"{_file_sha256(Path(path) / name)}  {name}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# -- writing ------------------------------------------------------------------------------


def output_format(output: str | os.PathLike[str]) -> str:
    """``'litert'`` or ``'onnx'`` from the output's extension; :class:`ExportError` otherwise."""
    suffix = Path(output).suffix.lower()
    if suffix not in FORMATS:
        raise ExportError(
            f"{output}: unknown extension {suffix or '(none)'!r}; the format follows it: "
            f"{' or '.join(FORMATS)} ({', '.join(f'{k} = {v}' for k, v in FORMATS.items())})."
        )
    return FORMATS[suffix]


def check_output(output: str | os.PathLike[str]) -> Path:
    """``output`` as a path whose directory exists and which is not a directory."""
    path = Path(output).absolute()
    output_format(path)
    if path.is_dir():
        raise ExportError(f"{output}: is a directory; give a file name ending in {' or '.join(FORMATS)}.")
    if not path.parent.is_dir():
        raise ExportError(f"{output}: the directory {path.parent} does not exist; create it first.")
    return path


@contextlib.contextmanager
def atomic_outputs(output: Path) -> Iterator[tuple[Path, Path]]:
    """Yields temporary sibling paths for ``output`` and its sidecar; when the block
    ends normally they are renamed to ``output`` and ``output.json`` (the file first;
    the file is removed again if the sidecar cannot follow), otherwise deleted."""
    token = secrets.token_hex(6)
    tmp_file = output.parent / f".{output.name}.tmp-{token}"
    tmp_sidecar = output.parent / f".{output.name}.json.tmp-{token}"
    try:
        yield tmp_file, tmp_sidecar
        os.replace(tmp_file, output)
        try:
            os.replace(tmp_sidecar, sidecar_path(output))
        except BaseException:
            output.unlink(missing_ok=True)
            raise
    finally:
        tmp_file.unlink(missing_ok=True)
        tmp_sidecar.unlink(missing_ok=True)


def sidecar_path(output: str | os.PathLike[str]) -> Path:
    """Where the sidecar of ``output`` goes: ``OUTPUT.json``."""
    return Path(f"{os.fspath(output)}.json")


# -- verification -------------------------------------------------------------------------


_APPLY_CACHE: OrderedDict[str, Callable[..., Any]] = OrderedDict()


def reference_function(model: nn.Module, variables: Mapping[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """``images -> logits`` of ``model.apply`` in eval mode (jitted, fast paths on).

    The jitted apply is kept per model (keyed by its repr, which lists every attribute),
    so exporting one model to several files compiles it once."""
    key = repr(model)
    if key not in _APPLY_CACHE:
        _APPLY_CACHE[key] = jax.jit(functools.partial(model.apply, train=False))
        if len(_APPLY_CACHE) > 8:
            _APPLY_CACHE.popitem(last=False)
    apply = _APPLY_CACHE[key]
    return lambda images: np.asarray(apply(variables, images))


def verification_inputs(input_shape: Sequence[int], batches: int = VERIFY_BATCHES, seed: int = 0) -> list[np.ndarray]:
    """Standard normal images: the scale of normalized pixels."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(tuple(input_shape)).astype(np.float32) for _ in range(batches)]


def float_parity(run: Callable[[np.ndarray], np.ndarray], reference: Callable[[np.ndarray], np.ndarray],
                 inputs: Sequence[np.ndarray]) -> dict[str, Any]:
    """The exported file's logits against ``model.apply``'s on ``inputs``: the largest
    absolute difference, as a fraction of the largest |logit|, against :data:`TOLERANCE`."""
    pairs = [(np.asarray(run(x)), reference(x)) for x in inputs]
    error = max(float(np.max(np.abs(got - want))) for got, want in pairs)
    scale = max(float(np.max(np.abs(want))) for _, want in pairs)
    relative = error / scale if scale else error
    return {"inputs": int(sum(len(x) for x in inputs)), "max_abs_error": error, "max_abs_logit": scale,
            "relative_error": relative, "tolerance": TOLERANCE, "passed": bool(relative <= TOLERANCE)}


def int8_comparison(run: Callable[[np.ndarray], np.ndarray], reference: Callable[[np.ndarray], np.ndarray],
                    batches: Iterable[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]) -> dict[str, Any]:
    """Top-1 of the int8 file against the float model (``model.apply``) on ``batches`` of
    ``(images, labels or None, mask or None)``: agreement, each one's accuracy where
    labels are given, and the logits' error per image (max |difference| over the image's
    largest |float logit|; median and worst: a rare image far outside the calibrated
    range saturates the int8 output)."""
    agree = float_correct = int8_correct = 0
    errors: list[np.ndarray] = []
    labelled = False
    for images, labels, mask in batches:
        mask = np.ones(len(images), bool) if mask is None else np.asarray(mask, bool)
        got, want = np.asarray(run(images))[mask], reference(images)[mask]
        got_top1, want_top1 = got.argmax(-1), want.argmax(-1)
        agree += int(np.sum(got_top1 == want_top1))
        if labels is not None:
            labelled = True
            float_correct += int(np.sum(want_top1 == np.asarray(labels)[mask]))
            int8_correct += int(np.sum(got_top1 == np.asarray(labels)[mask]))
        scale = np.max(np.abs(want), axis=-1)
        errors.append(np.max(np.abs(got - want), axis=-1) / np.where(scale > 0, scale, 1.0))
    count = int(sum(len(e) for e in errors))
    if not count:
        raise ExportError("no images to compare the int8 file with the float model on.")
    relative = np.concatenate(errors)
    report = {"examples": count, "top1_agreement": agree / count,
              "median_relative_logit_error": float(np.median(relative)),
              "max_relative_logit_error": float(np.max(relative))}
    if labelled:
        report.update(float_top1=float_correct / count, int8_top1=int8_correct / count)
    return report


# -- the exports --------------------------------------------------------------------------


def _convert(fmt: str, model: nn.Module, variables: Mapping[str, Any], input_shape: tuple[int, ...],
             calibration: Sequence[np.ndarray] | None) -> bytes:
    """The exported file's bytes (int8 when ``calibration`` is given)."""
    from ca_flax.export import litert

    if fmt == "litert":
        return litert.to_tflite(model, variables, input_shape, representative=calibration)
    from ca_flax.export import onnx_file

    onnx = onnx_file.to_onnx(litert.to_tflite(model, variables, input_shape))
    return onnx_file.quantize_onnx(onnx, calibration) if calibration is not None else onnx


def _runtime(fmt: str) -> tuple[Callable[..., Callable[[np.ndarray], np.ndarray]], Callable[..., dict], str]:
    """``(runner, io description, runtime name)`` of a format."""
    from ca_flax.export import litert

    if fmt == "litert":
        return litert.tflite_runner, litert.tflite_io, litert.runtime_name()
    from ca_flax.export import onnx_file

    return onnx_file.onnx_runner, onnx_file.onnx_io, "onnxruntime"


def export(
    model: nn.Module,
    variables: Mapping[str, Any],
    output: str | os.PathLike[str],
    *,
    image_size: int = 224,
    batch_size: int = 1,
    quantize: str | None = None,
    calibration: Iterable[np.ndarray] | None = None,
    heldout: Iterable[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] | None = None,
    verify: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Exports ``model`` with ``variables`` to ``output``; the format follows its extension.

    Args:
      model, variables: a model and its ``{'params', 'batch_stats'}``.
      output: ``*.tflite`` (LiteRT) or ``*.onnx``; ``output.json`` is written beside it.
      image_size, batch_size: the exported input is ``(batch_size, image_size,
        image_size, in_channels)`` float32, normalized as in training.
      quantize: ``None`` (float32) or ``'int8'`` (post-training, needs ``calibration``).
      calibration: int8 only: batches of that input shape to calibrate on (real images).
      heldout: int8 only: ``(images, labels, mask)`` batches (labels and mask may be
        None) for the comparison with the float model; default the calibration batches.
      verify: run the file in its runtime before it is renamed into place: float32
        logits within :data:`TOLERANCE` of the largest (else :class:`VerificationError`
        and nothing is written); int8 top-1 agreement and accuracies reported.
      metadata: extra sidecar fields (``source``, ``labels``, ``preprocessing``...).

    Returns the sidecar's content. Raises :class:`ExportError` on bad input.
    """
    path = check_output(output)
    fmt = output_format(path)
    input_shape = check_image_size(image_size, batch_size, int(getattr(model, "in_channels", 3)))
    if quantize not in (None, *QUANTIZE):
        raise ExportError(f"quantize must be one of {QUANTIZE} or None, got {quantize!r}.")
    batches = None
    if quantize:
        batches = [np.asarray(b, np.float32) for b in (calibration or ())]
        if not batches or any(b.shape != input_shape for b in batches):
            raise ExportError(f"int8 needs calibration batches of shape {input_shape} (real images, normalized).")
    started = time.perf_counter()
    data = _convert(fmt, model, variables, input_shape, batches)
    seconds = time.perf_counter() - started
    runner, describe_io, runtime = _runtime(fmt)
    with atomic_outputs(path) as (tmp_file, tmp_sidecar):
        tmp_file.write_bytes(data)
        report = None
        if verify:
            report = _verify(runner(tmp_file), model, variables, input_shape, quantize, heldout or
                             [(b, None, None) for b in batches or ()])
        sidecar = _sidecar(path, data, fmt, runtime, describe_io(tmp_file), model, quantize, report, seconds, metadata)
        tmp_sidecar.write_text(json.dumps(sidecar, indent=2, allow_nan=False) + "\n")
    return sidecar


def _verify(run, model, variables, input_shape, quantize, comparison) -> dict[str, Any]:
    reference = reference_function(model, variables)
    if quantize:
        return int8_comparison(run, reference, comparison)
    report = float_parity(run, reference, verification_inputs(input_shape))
    if not report["passed"]:
        raise VerificationError(
            f"the exported file's logits differ from model.apply by {report['relative_error']:.2e} of the largest "
            f"logit (tolerance {TOLERANCE:g}); nothing was written. Please report this with the model's configuration."
        )
    return report


def _sidecar(path: Path, data: bytes, fmt: str, runtime: str, io: dict, model: nn.Module, quantize: str | None,
             report: dict | None, seconds: float, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    from ca_flax.checkpoints import CheckpointError, model_config

    metadata = dict(metadata or {})
    try:
        config = model_config(model)
    except CheckpointError:  # a module the checkpoint format does not know: no configuration to record
        config = None
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "file": path.name,
        "file_sha256": hashlib.sha256(data).hexdigest(),
        "file_bytes": len(data),
        "runtime": runtime,
        "format_name": {"litert": "LiteRT (TFLite flatbuffer)", "onnx": "ONNX"}[fmt],
        "input": {**io["input"], "layout": "NHWC", "color": "RGB", "normalization": normalization()},
        "output": {**io["output"], "meaning": "logits (no softmax)"},
        "preprocessing": metadata.pop("preprocessing", None),
        "num_classes": int(io["output"]["shape"][-1]),
        "labels": metadata.pop("labels", None),
        "quantization": quantize,
        "model": {"architecture": type(model).__name__, "config": config},
        "source": metadata.pop("source", None),
        "verification": report,
        "conversion_seconds": round(seconds, 3),
        "exporter": _versions(fmt),
        **metadata,
    }


def normalization() -> dict[str, Any]:
    """How pixels become the exported input (``ca_flax/data/preprocess.py``'s normalize)."""
    return {"pixel_range": [0, 255], "mean": list(MEAN_RGB), "std": list(STDDEV_RGB),
            "formula": "input = (pixel - mean) / std, per RGB channel, pixels on the 0..255 scale"}


def _versions(fmt: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["ca-flax", "jax", "tensorflow-cpu", "tensorflow"]
    names += ["tf2onnx", "onnx", "onnxruntime"] if fmt == "onnx" else ["ai-edge-litert"]
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return {"path": "jax2tf -> LiteRT converter" + (" -> tf2onnx" if fmt == "onnx" else ""), **found}


def export_tflite(model: nn.Module, variables: Mapping[str, Any], output: str | os.PathLike[str],
                  **options: Any) -> dict[str, Any]:
    """:func:`export` to a LiteRT file (``output`` must end in ``.tflite``)."""
    return _export_as(".tflite", model, variables, output, **options)


def export_onnx(model: nn.Module, variables: Mapping[str, Any], output: str | os.PathLike[str],
                **options: Any) -> dict[str, Any]:
    """:func:`export` to an ONNX file (``output`` must end in ``.onnx``)."""
    return _export_as(".onnx", model, variables, output, **options)


def _export_as(suffix: str, model, variables, output, **options) -> dict[str, Any]:
    if Path(output).suffix.lower() != suffix:
        raise ExportError(f"{output}: this exporter writes {suffix} files; name the output *{suffix}.")
    return export(model, variables, output, **options)


__all__ = [
    "FORMATS", "SHA256_DEFINITION", "TOLERANCE", "VerificationError", "atomic_outputs", "check_output",
    "checkpoint_files", "checkpoint_sha256", "export", "export_onnx", "export_tflite", "float_parity",
    "int8_comparison", "normalization", "output_format", "reference_function", "sidecar_path",
    "verification_inputs",
]
