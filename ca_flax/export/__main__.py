"""Export a checkpoint to LiteRT (``.tflite``) or ONNX (``.onnx``), verified in its runtime.

    python -m ca_flax.export CHECKPOINT OUTPUT [--image-size 224] [--batch-size 1]
        [--quantize int8 --calibration DATASET [--calibration-steps 100] [--data-dir DIR]]

CHECKPOINT is a training workdir or a model checkpoint (``python -m ca_flax.convert``
output included); the format follows OUTPUT's extension. Writes OUTPUT and OUTPUT.json.
Exit 0 on success, 2 with a one-paragraph message on bad input, 1 when the exported file
does not match the model (nothing is written then).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any, Sequence

from ca_flax.export.api import (
    QUANTIZE, SHA256_DEFINITION, TOLERANCE, VerificationError, check_output, checkpoint_sha256, output_format,
    sidecar_path,
)
from ca_flax.export.graph import ExportError, check_image_size

DEFAULT_IMAGE_SIZE = 224
DEFAULT_CALIBRATION_STEPS = 100
# What each format needs at export time (the `export` extra installs them all).
REQUIRED_MODULES = {"litert": ("tensorflow", "ai_edge_litert"), "onnx": ("tensorflow", "tf2onnx", "onnx", "onnxruntime")}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one 'error:' paragraph and exit 2, like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(f"{message} (see python -m ca_flax.export --help).")


def _fail(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m ca_flax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="training workdir or model checkpoint directory")
    parser.add_argument("output", help="OUTPUT.tflite (LiteRT) or OUTPUT.onnx; OUTPUT.json is written beside it")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"input side (default: the size a training workdir records, else {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--batch-size", type=int, default=1, help="fixed batch of the exported input (default 1)")
    parser.add_argument("--quantize", choices=QUANTIZE, default=None, help="post-training quantization")
    parser.add_argument("--calibration", metavar="DATASET", default=None,
                        help="int8: a TFDS name, 'folder' (with --data-dir) or 'digits'")
    parser.add_argument("--data-dir", default=None, help="the calibration dataset's directory")
    parser.add_argument("--calibration-steps", type=int, default=DEFAULT_CALIBRATION_STEPS,
                        help="int8: batches of training images to calibrate on (default 100)")
    parser.add_argument("--eval-examples", type=int, default=None,
                        help="int8: held-out images to compare on (default: the whole evaluation split)")
    parser.add_argument("--which", choices=("latest", "best"), default="latest", help="training workdir step")
    parser.add_argument("--no-verify", action="store_true", help="skip running the file in its runtime")
    return parser


def _check_arguments(args: argparse.Namespace) -> str:
    """Everything checkable before a model is loaded; returns the format."""
    fmt = output_format(args.output)
    check_output(args.output)
    check_image_size(args.image_size or DEFAULT_IMAGE_SIZE, args.batch_size)
    if args.quantize and not args.calibration:
        raise ExportError("--quantize int8 needs --calibration DATASET (a TFDS name, 'folder' with --data-dir, or "
                          "'digits'): int8 ranges are calibrated on real images.")
    if args.calibration and not args.quantize:
        raise ExportError("--calibration is for --quantize int8; a float32 export needs no calibration.")
    if args.calibration_steps < 1 or (args.eval_examples is not None and args.eval_examples < 1):
        raise ExportError("--calibration-steps and --eval-examples must be positive.")
    missing = [m for m in REQUIRED_MODULES[fmt] if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"exporting to {fmt} needs {', '.join(missing)}: pip install 'ca-flax[export]'.")
    return fmt


def _labels(dataset: str | None, data_dir: str | None, num_classes: int) -> list[str] | None:
    """The dataset's label names when it opens and has the model's class count."""
    from ca_flax.export.dataset import class_names

    if not dataset:
        return None
    try:
        count, names = class_names(dataset, data_dir)
    except ExportError:
        return None
    return list(names) if count == num_classes and len(names) == num_classes else None


def _preprocessing(dataset: str | None, image_size: int) -> dict[str, Any]:
    """The evaluation preprocessing the input expects (``ca_flax/data/preprocess.py``)."""
    from ca_flax.data import default_augment

    augment = default_augment(dataset or "imagenet2012")
    fraction = augment.eval_crop_fraction
    return {
        "center_crop_fraction": fraction,
        "resize_method": augment.resize_method,
        "antialias": True,
        "description": (f"take the central square of side {fraction:g} * min(height, width), resize it to "
                        f"{image_size}x{image_size} ({augment.resize_method}, antialiased): the same as resizing the "
                        f"shorter side to {round(image_size / fraction)} and center-cropping {image_size}; "
                        "then normalize"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The export the arguments describe; returns the sidecar."""
    from ca_flax.checkpoints import CheckpointError, read_metadata, restore
    from ca_flax.export import api, dataset

    _check_arguments(args)
    try:
        recorded = read_metadata(args.checkpoint).get("source") or {}
        image_size = args.image_size or recorded.get("image_size") or DEFAULT_IMAGE_SIZE
        check_image_size(image_size, args.batch_size)
        model, variables, step = restore(args.checkpoint, which=args.which)
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    labels_from = args.calibration or recorded.get("dataset")
    calibration = heldout = None
    if args.quantize:
        count, _ = dataset.class_names(args.calibration, args.data_dir)
        if count != model.num_classes:
            raise ExportError(f"the model has {model.num_classes} classes but {args.calibration} has {count}: "
                              "calibrate on the dataset the model was trained for.")
        calibration = dataset.calibration_batches(args.calibration, args.data_dir, image_size, args.batch_size,
                                                  args.calibration_steps)
        heldout = dataset.heldout_batches(args.calibration, args.data_dir, image_size, args.batch_size,
                                          args.eval_examples)
    checkpoint = Path(args.checkpoint).absolute()
    source = {
        "checkpoint": str(checkpoint),
        "kind": "model checkpoint" if (checkpoint / "variables").is_dir() else "training workdir",
        "step": step,
        "sha256": checkpoint_sha256(checkpoint, step),
        "sha256_definition": SHA256_DEFINITION,
        "provenance": recorded or None,
    }
    metadata = {"source": source, "labels": _labels(labels_from, args.data_dir, model.num_classes),
                "preprocessing": _preprocessing(labels_from, image_size)}
    if calibration is not None:
        metadata["calibration"] = {"dataset": args.calibration, "split": "train",
                                   "images": sum(len(batch) for batch in calibration)}
    sidecar = api.export(model, variables, args.output, image_size=image_size, batch_size=args.batch_size,
                         quantize=args.quantize, calibration=calibration, heldout=heldout,
                         verify=not args.no_verify, metadata=metadata)
    return sidecar


def summary(output: str, sidecar: dict[str, Any]) -> str:
    """What was written and how it compares with the model, for the console."""
    lines = [f"wrote {output} ({sidecar['file_bytes']:,} bytes, {sidecar['format_name']}, "
             f"{sidecar['quantization'] or 'float32'}, input {'x'.join(map(str, sidecar['input']['shape']))}) "
             f"and {sidecar_path(output)} in {sidecar['conversion_seconds']:.1f} s"]
    report = sidecar["verification"]
    if report is None:
        lines.append("not verified (--no-verify)")
    elif "relative_error" in report:
        lines.append(f"verified in {sidecar['runtime']}: float32 logits within {report['relative_error']:.2e} of the "
                     f"largest logit of model.apply on {report['inputs']} images (tolerance {TOLERANCE:g})")
    else:
        text = (f"verified in {sidecar['runtime']}: int8 top-1 agrees with the float model on "
                f"{report['top1_agreement']:.1%} of {report['examples']} held-out images (logits off by "
                f"{report['median_relative_logit_error']:.1%} of the largest, median over images)")
        if "float_top1" in report:
            text += f"; held-out top-1: float {report['float_top1']:.1%}, int8 {report['int8_top1']:.1%}"
        lines.append(text)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        sidecar = run(args)
    except (ExportError, OSError) as error:
        _fail(str(error) if isinstance(error, ExportError) else f"cannot write {args.output}: {error}")
    except VerificationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary(args.output, sidecar))
    return 0


if __name__ == "__main__":
    sys.exit(main())
