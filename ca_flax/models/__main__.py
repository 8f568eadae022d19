"""Command line for the model zoo.

    python -m ca_flax.models list
    python -m ca_flax.models summary mobilenetv2_ca [--width 0.5] [--image-size 224] [--depth 2]
    python -m ca_flax.models summary mobilenetv2_ca --tabulate   # Flax's own table, with XLA flops
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from ca_flax.models import create_model, describe_model, list_models
from ca_flax.models.summary import summarize


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ca_flax.models", description="ca-flax model zoo.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered models")
    summary = sub.add_parser("summary", help="parameters and MAdds per layer and in total")
    summary.add_argument("name", help="registered model name (see `list`)")
    summary.add_argument("--width", type=float, default=None, help="width multiplier (default: the variant's)")
    summary.add_argument("--num-classes", type=int, default=1000)
    summary.add_argument("--image-size", type=int, default=224)
    summary.add_argument("--depth", type=int, default=1, help="module nesting depth of the rows")
    summary.add_argument(
        "--tabulate", action="store_true",
        help="print Flax's nn.tabulate table instead (all XLA flops, BatchNorm and activations included)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        for name in list_models():
            print(f"{name:<20}{describe_model(name)}")
        return 0
    try:
        model = create_model(args.name, num_classes=args.num_classes, width_mult=args.width)
        if args.image_size < 1:
            raise ValueError(f"--image-size must be positive, got {args.image_size}.")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shape = (1, args.image_size, args.image_size, 3)
    if args.tabulate:
        print(model.tabulate(jax.random.PRNGKey(0), jnp.zeros(shape), compute_flops=True, depth=args.depth))
    else:
        print(f"{args.name} (width {model.width_mult}, {args.num_classes} classes)")
        print(summarize(model, shape, depth=args.depth).format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
