"""What the command lines that restore a checkpoint (predict, visualize attention) share."""

from __future__ import annotations

import argparse


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ca_flax.predict.load_predictor``: the checkpoint and overrides of
    what it records."""
    parser.add_argument("--checkpoint", required=True, help="training workdir or converted checkpoint directory")
    parser.add_argument("--which", choices=["latest", "best"], default="latest", help="which workdir checkpoint")
    parser.add_argument("--dataset", default=None, help="override the dataset recorded (its preprocessing and names)")
    parser.add_argument("--image-size", type=int, default=None, help="override the image size recorded")
    parser.add_argument("--data_dir", default=None, help="where a 'folder' or TFDS dataset is (for class names)")
