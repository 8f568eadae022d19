"""Real images for int8 calibration and the held-out comparison, through the project's
own evaluation preprocessing (``ca_flax.data``: central crop, resize, ImageNet mean/std).

Calibration reads the training split (a fixed, seeded spread over it for in-memory
datasets; the first records for TFDS), so the held-out split the accuracies are
reported on is never calibrated on.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from ca_flax.export.graph import ExportError


def calibration_batches(
    name: str, data_dir: str | os.PathLike[str] | None, image_size: int, batch_size: int, steps: int
) -> list[np.ndarray]:
    """``steps`` batches of ``batch_size`` training images of dataset ``name``, preprocessed
    for evaluation (float32 NHWC, normalized)."""
    from ca_flax.data import default_augment
    from ca_flax.data._tf import tf
    from ca_flax.data.preprocess import preprocess_eval
    from ca_flax.data.sources import IndexedSource, open_source

    source = _open(name, data_dir, open_source)
    info = source.info
    count = min(steps * batch_size, info.num_train)
    if count < batch_size:
        raise ExportError(f"{name!r} has {info.num_train} training images, fewer than one batch of {batch_size}.")
    if isinstance(source, IndexedSource):
        # A seeded spread over the split, not its first (often one-class) entries.
        order = np.random.default_rng(0).permutation(info.num_train)[:count].astype(np.int64)
        records = tf.data.Dataset.from_tensor_slices(order).map(source.reader(info.train_split))
    else:
        records = source.stream(info.train_split).take(count)
    augment = default_augment(name)
    preprocess = tf.autograph.experimental.do_not_convert(
        lambda image, label: preprocess_eval(image, image_size, augment))
    images = records.map(preprocess).batch(batch_size, drop_remainder=True)
    return list(images.as_numpy_iterator())


def heldout_batches(
    name: str, data_dir: str | os.PathLike[str] | None, image_size: int, batch_size: int, limit: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(images, labels, mask)`` batches of the evaluation split (``ca_flax.data.eval_batches``),
    stopping after ``limit`` examples when given (the rest of that batch masked)."""
    from ca_flax.data import eval_batches

    seen = 0
    for batch in eval_batches(name, data_dir=data_dir, image_size=image_size, global_batch_size=batch_size):
        mask = batch["mask"].copy()
        if limit is not None:
            mask &= np.cumsum(mask) + seen <= limit
        seen += int(mask.sum())
        if mask.any():
            yield batch["image"], batch["label"], mask
        if limit is not None and seen >= limit:
            return


def class_names(name: str, data_dir: str | os.PathLike[str] | None) -> tuple[int, tuple[str, ...]]:
    """``(class count, label names)`` of dataset ``name`` (names empty where unknown)."""
    from ca_flax.data import dataset_info

    info = _open(name, data_dir, lambda n, d: dataset_info(n, d))
    return info.num_classes, tuple(info.class_names)


def _open(name: str, data_dir, opener):
    try:
        return opener(name, data_dir)
    except ValueError as error:
        raise ExportError(f"dataset {name!r}: {error}") from None


__all__ = ["calibration_batches", "class_names", "heldout_batches"]
