"""Synthetic ImageNet-shaped data (``dataset='fake'``), for measuring training speed
without an input pipeline: one random batch, generated once, served forever."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ca_flax.data.config import DatasetInfo

NAME = "fake"
NUM_CLASSES = 1000
NUM_TRAIN = 1_281_167  # ImageNet's, so epochs mean the same as there
NUM_EVAL = 50_000


def info() -> DatasetInfo:
    return DatasetInfo(
        name=NAME, num_classes=NUM_CLASSES, num_train=NUM_TRAIN, num_eval=NUM_EVAL,
        train_split="train", eval_split="validation",
    )


def batches(*, image_size: int, global_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
            mask: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Endless copies of this process's rows of one random global batch."""
    local = global_batch_size // process_count
    gen = np.random.default_rng(seed + process_index)
    batch = {
        "image": gen.standard_normal((local, image_size, image_size, 3), dtype=np.float32),
        "label": gen.integers(0, NUM_CLASSES, local, dtype=np.int32),
    }
    if mask:
        batch["mask"] = np.ones(local, bool)
    while True:
        yield batch
