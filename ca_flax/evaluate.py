"""Evaluate a training workdir or a converted checkpoint on a dataset.

    python -m ca_flax.evaluate --checkpoint workdirs/default
    python -m ca_flax.evaluate --checkpoint ckpt/mbv2_ca --dataset imagenet2012 --data_dir /data/tfds --image_size 224

Prints top-1, top-5 and loss over every example of the evaluation split, exactly once
(padded, masked batches), as JSON on the last line. Exit 2 with a message on bad input.
An unreadable newest checkpoint of a workdir is skipped for the next older one with a
warning; the workdir is only read (a run may be training in it). Needs the ``train``
extra (the input pipeline and the trainer's evaluation): ``pip install 'ca-flax[train]'``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import warnings
from typing import Any

from ca_flax._extras import require

require("python -m ca_flax.evaluate", "train")

import jax  # noqa: E402

from ca_flax import data  # noqa: E402
from ca_flax.checkpoints import CheckpointError, read_metadata, restore  # noqa: E402
from ca_flax.inference import predict_fn, usable_cores, use_cpu_device_per_core  # noqa: E402
from ca_flax.training import parallel  # noqa: E402
from ca_flax.training.state import TrainState  # noqa: E402
from ca_flax.training.steps import eval_step  # noqa: E402
from ca_flax.training.trainer import evaluate  # noqa: E402


def evaluate_checkpoint(
    checkpoint: str, *, dataset: str | None = None, data_dir: str | None = None, image_size: int | None = None,
    batch_size: int = 128, which: str = "latest",
) -> dict[str, Any]:
    """Top-1/top-5/loss of the checkpoint at ``checkpoint`` on ``dataset``'s eval split.

    A training workdir remembers its dataset and image size; a converted checkpoint
    needs ``dataset`` (and usually ``image_size``).
    """
    source = read_metadata(checkpoint).get("source") or {}
    dataset = dataset or source.get("dataset")
    if not dataset:
        raise ValueError(f"{checkpoint} does not record a dataset; pass --dataset (e.g. imagenet2012).")
    image_size = image_size or source.get("image_size") or 224
    data.validate_dataset(dataset, data_dir)
    info = data.dataset_info(dataset, data_dir)
    model, variables, step = restore(checkpoint, which=which)
    if model.num_classes != info.num_classes:
        raise ValueError(
            f"{checkpoint} has {model.num_classes} classes but {dataset} has {info.num_classes}; "
            "evaluate on the dataset it was trained or converted for."
        )
    parallel.check_batch_divisible(batch_size)
    mesh = parallel.make_mesh()
    state = jax.device_put(
        TrainState(step=step, apply_fn=model.apply, params=variables["params"],
                   batch_stats=variables.get("batch_stats", {}), tx=None, opt_state=None, rng=None),
        parallel.replicated(mesh),
    )
    eval_fn = jax.jit(functools.partial(eval_step, num_classes=info.num_classes, predict=predict_fn(model, mesh=mesh)))
    batches = data.eval_batches(
        dataset, data_dir=data_dir, image_size=image_size, global_batch_size=batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    metrics = evaluate(state, eval_fn, batches, parallel.data_sharding(mesh))
    return {"checkpoint": str(checkpoint), "step": step, "dataset": dataset, "image_size": image_size, **metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ca_flax.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="training workdir or converted checkpoint directory")
    parser.add_argument("--dataset", default=None, help="TFDS name, 'digits' or 'folder' (default: the one trained on)")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--which", choices=["latest", "best"], default="latest", help="which workdir checkpoint")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be positive, got {args.batch_size}.")
    # One CPU device per core (a divisor of the batch, so any batch size still splits
    # evenly): each core evaluates its own rows (ca_flax.inference). GPUs and TPUs are unaffected.
    try:
        use_cpu_device_per_core(math.gcd(usable_cores(), args.batch_size))
    except RuntimeError:  # main() called after JAX started: keep the devices it has
        pass
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _print_warning
            result = evaluate_checkpoint(
                args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size,
                batch_size=args.batch_size, which=args.which,
            )
    except (ValueError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"top-1 {result['eval_top1']:.4f}  top-5 {result['eval_top5']:.4f}  loss {result['eval_loss']:.4f}  "
          f"({result['eval_examples']} examples of {result['dataset']}, step {result['step']})")
    print(json.dumps(result))
    return 0


def _print_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    """A warning as one ``warning: ...`` line, like the errors."""
    print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
