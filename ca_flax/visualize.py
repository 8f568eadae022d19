"""Pictures of a model and of its training: attention maps and training curves.

    python -m ca_flax.visualize attention --checkpoint workdirs/default digit.png --output attention.png
    python -m ca_flax.visualize curves runs/baseline runs/se runs/cbam runs/ca --output curves.png

``attention``: the image as the checkpoint's evaluation sees it, and each attention
block's map over it (Coordinate Attention: ``a_h x a_w`` averaged over channels; CBAM:
its spatial gate), with the block's name, stride and value range; for SE, which has no
spatial map, its channel gates as bar charts. ``curves``: train loss, eval top-1/top-5
and learning rate against step (and epoch) from each workdir's ``metrics.jsonl``, the
runs overlaid. Pictures are written atomically; the format follows the suffix. Exit 2
with a one-line ``error:`` on bad input. Needs matplotlib (``pip install 'ca-flax[viz]'``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ca_flax.viz.cli import add_checkpoint_arguments
from ca_flax.viz.plotting import MissingExtraError, check_output, save_figure


def attention(args: argparse.Namespace) -> None:
    """The attention subcommand: restore, read the image, record the gates, draw."""
    import jax
    import numpy as np

    from ca_flax.predict import load_predictor, top_k
    from ca_flax.viz.attention import attention_figure, model_attention
    from ca_flax.viz.images import read_image, to_display

    predictor = load_predictor(args.checkpoint, which=args.which, dataset=args.dataset, image_size=args.image_size,
                               data_dir=args.data_dir)
    image, note = read_image(args.image, predictor.preprocessing)
    if note:
        print(f"note: {args.image}: {note}", file=sys.stderr)
    logits, blocks = model_attention(predictor.model, predictor.variables, image[None])
    if not blocks:
        raise ValueError(f"{args.checkpoint}: the model has no attention blocks (attention=None), "
                         "so there is no attention map to draw.")
    if all(b.spatial is None for b in blocks):
        print(f"note: {blocks[0].kind.upper()} gates channels only and has no spatial map; "
              "drawing its channel gates as bar charts instead.", file=sys.stderr)
    best = top_k(np.asarray(jax.nn.softmax(logits[0].astype(np.float32))), predictor.names, 1)[0]
    label = best["label"] if best["label"] is not None else f"class {best['index']}"
    title = (f"{Path(args.checkpoint).resolve().name} (step {predictor.step}) on {Path(args.image).name}: "
             f"{label} ({best['probability']:.0%})")
    save_figure(attention_figure(to_display(image), blocks, title=title), args.output, dpi=args.dpi)


def curves(args: argparse.Namespace) -> None:
    """The curves subcommand: read each workdir's metrics, overlay, draw."""
    from ca_flax.viz.curves import plot_curves, read_run

    if args.names and len(args.names) != len(args.workdirs):
        raise ValueError(f"--names gives {len(args.names)} names for {len(args.workdirs)} workdirs.")
    names = args.names or [None] * len(args.workdirs)
    runs = [read_run(workdir, name) for workdir, name in zip(args.workdirs, names)]
    save_figure(plot_curves(runs), args.output, dpi=args.dpi)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ca_flax.visualize", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    maps = commands.add_parser("attention", help="attention maps of one image, overlaid on it")
    maps.add_argument("image", metavar="IMAGE", help="a JPEG, PNG, GIF or BMP file")
    maps.add_argument("--output", required=True, help="the picture to write (.png, .svg, .pdf, ...)")
    add_checkpoint_arguments(maps)
    maps.set_defaults(run=attention)

    lines = commands.add_parser("curves", help="training curves of one or more workdirs, overlaid")
    lines.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="training workdirs (with metrics.jsonl)")
    lines.add_argument("--output", required=True, help="the picture to write (.png, .svg, .pdf, ...)")
    lines.add_argument("--names", nargs="+", default=None, help="a legend name per workdir (default: its directory)")
    lines.set_defaults(run=curves)

    for command in (maps, lines):
        command.add_argument("--dpi", type=int, default=100, help="resolution of a raster picture (default 100)")
    args = parser.parse_args(argv)
    # TensorFlow decodes the images; its C++ warnings (a failed decode logs one) would
    # only repeat our one-line error.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("image_size", "dpi"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}.")
    try:
        check_output(args.output)  # a missing matplotlib or a bad suffix, before any work
        args.run(args)
    except (MissingExtraError, ValueError) as error:  # CheckpointError and ImageError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
