"""Command line: ``python -m ca_flax.convert SRC DST``.

PyTorch weights -> ca-flax checkpoint directory (default), or with ``--to-torch`` a
ca-flax checkpoint directory -> PyTorch weights file (.pth/.pt/.bin, .safetensors, .npz).
Exit status 0 on success, 2 with a one-paragraph message on stderr for bad input. The
destination is written atomically: it is complete or absent.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Sequence

from ca_flax.convert.errors import ConversionError
from ca_flax.convert.io import READ_SUFFIXES, SUFFIXES, save_state_dict
from ca_flax.convert.layouts import FAMILIES, LAYOUTS

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ca_flax.convert",
        description=(
            "Convert MobileNetV2 and MobileNeXt weights from PyTorch (the authors' MobileNetV2+CA mbv2_ca.pth, "
            "torchvision's mobilenet_v2, timm's mobilenetv2_*, the authors' MobileNeXt) into a ca-flax model checkpoint, "
            "or back with --to-torch. The layout and the model configuration are inferred."
        ),
    )
    parser.add_argument("src", metavar="SRC", help=f"PyTorch weights ({', '.join(READ_SUFFIXES)}), or with --to-torch a ca-flax checkpoint directory")
    parser.add_argument("dst", metavar="DST", help="ca-flax checkpoint directory to create, or with --to-torch the weights file to write")
    parser.add_argument("--to-torch", action="store_true", help="export a ca-flax checkpoint as a PyTorch state dict")
    parser.add_argument(
        "--layout", choices=("auto",) + tuple(LAYOUTS), default="auto",
        help="state-dict layout (default: detected on import; on export, the one the checkpoint was converted from, "
        "else the family's only one, or 'official' for MobileNetV2 CA models)",
    )
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the checkpoint's); another value re-initializes the classifier for fine-tuning")
    parser.add_argument("--no-strict", dest="strict", action="store_false", help="ignore keys that are not part of the layout")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false", help="take the raw weights when a checkpoint also holds EMA weights")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists (never SRC or a directory holding it)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return parser


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_not_source(src: Path, dst: Path) -> None:
    """Refuses a DST that is SRC, by any path (``./x.pth``, a symlink, a hard link), or a
    directory holding it: writing DST replaces it as a whole, and the input with it."""
    real_src, real_dst = Path(os.path.realpath(src)), Path(os.path.realpath(dst))
    if real_src == real_dst or (src.exists() and dst.exists() and os.path.samefile(src, dst)):
        raise ConversionError(f"{dst}: is SRC ({src}); writing it would destroy the input. Choose another DST.")
    if real_dst in real_src.parents:
        raise ConversionError(f"{dst}: holds SRC ({src}); replacing it would delete the input. Choose another DST.")


def import_weights(args: argparse.Namespace) -> str:
    """SRC (PyTorch weights) -> DST (ca-flax checkpoint); returns the summary."""
    from ca_flax.checkpoints import save_model
    from ca_flax.convert.api import from_torch

    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:  # fail before the (slow) conversion
        raise ConversionError(f"{dst}: already exists; pass --overwrite to replace it.")
    model, variables, report = from_torch(
        args.src, layout=args.layout, num_classes=args.num_classes, strict=args.strict, use_ema=args.use_ema
    )
    source = {"converter": "ca_flax.convert", **report.as_dict(), "sha256": _sha256(Path(args.src))}
    save_model(dst, model, variables, source=source, overwrite=args.overwrite)
    return f"{report.summary()}\nwrote {dst}"


def export_weights(args: argparse.Namespace) -> str:
    """SRC (ca-flax checkpoint) -> DST (PyTorch weights file); returns the summary."""
    from ca_flax.checkpoints import load_model, read_metadata
    from ca_flax.convert.api import to_torch

    dst = Path(args.dst)
    if dst.suffix.lower() not in SUFFIXES:
        raise ConversionError(f"{dst}: unknown output type {dst.suffix or '(no suffix)'!r}; use one of {', '.join(SUFFIXES)}.")
    if dst.exists() and not args.overwrite:
        raise ConversionError(f"{dst}: already exists; pass --overwrite to replace it.")
    source = read_metadata(args.src).get("source") or {}
    model, variables = load_model(args.src)
    layout = args.layout
    if layout == "auto":
        # The model's family's layouts: its only one, or for MobileNetV2 'official' for CA models.
        names = [l.name for f in FAMILIES.values() if isinstance(model, f.architecture) for l in f.layouts]
        default = names[0] if len(names) == 1 else ("official" if model.attention == "ca" and "official" in names else None)
        layout = source.get("layout") or default
        if layout not in LAYOUTS:
            raise ConversionError(
                f"{args.src}: cannot tell which PyTorch layout to write (the checkpoint records none); "
                f"pass --layout {' or '.join(n for n in (names or LAYOUTS) if n != 'official')}."
            )
    state = to_torch(model, variables, layout, num_batches_tracked=int(source.get("num_batches_tracked") or 0))
    save_state_dict(state, dst, overwrite=args.overwrite)
    return f"{args.src}: wrote {len(state)} tensors in the {layout} layout to {dst}"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    from ca_flax.checkpoints import CheckpointError

    try:
        check_not_source(Path(args.src), Path(args.dst))
        summary = export_weights(args) if args.to_torch else import_weights(args)
    except (ConversionError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # disk full, permissions: not the input's fault
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
