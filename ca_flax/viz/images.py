"""Image files in, the checkpoint's own evaluation view out.

A checkpoint's evaluation preprocessing is what ``python -m ca_flax.evaluate`` applies
to it: a training workdir records its dataset and image size in ``model.json``; a
converted PyTorch checkpoint (1000 classes) gets ImageNet's (224, central 0.875 crop,
ImageNet mean/std). Files go through the same decode / crop / resize / normalize code
as the evaluation split (``ca_flax.data.preprocess.preprocess_eval``), so a prediction
on a file equals the evaluation's on the same encoded image.

Conversions (documented, never silent: :func:`read_image` returns a note): grayscale is
replicated to RGB, an alpha channel is dropped (not composited), an animation gives its
first frame.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ca_flax._extras import require
from ca_flax.data.config import MEAN_RGB, STDDEV_RGB, AugmentConfig, default_augment

IMAGENET = "imagenet2012"
IMAGENET_IMAGE_SIZE = 224
FORMATS = "JPEG, PNG, GIF or BMP"
_CHANNEL_NOTES = {
    1: "grayscale: replicated to RGB",
    2: "grayscale with alpha: alpha dropped, gray replicated to RGB",
    4: "RGBA: alpha channel dropped (not composited)",
}


class ImageError(ValueError):
    """An image file cannot be read or decoded; the message names the file."""


@dataclasses.dataclass(frozen=True)
class EvalPreprocessing:
    """How a checkpoint's evaluation sees an image.

    Attributes:
      dataset: the dataset it was trained (or converted) for, None when unknown.
      image_size: the side of the square the model gets.
      augment: its ``eval_crop_fraction`` and ``resize_method`` apply.
    """

    dataset: str | None
    image_size: int
    augment: AugmentConfig


def eval_preprocessing(
    metadata: Mapping[str, Any], *, dataset: str | None = None, image_size: int | None = None
) -> EvalPreprocessing:
    """The evaluation preprocessing of the checkpoint whose ``model.json`` is ``metadata``,
    as ``ca_flax.evaluate`` chooses it; ``dataset`` and ``image_size`` override."""
    source = metadata.get("source") or {}
    num_classes = (metadata.get("config") or {}).get("num_classes")
    if dataset is None:
        dataset = source.get("dataset")
    if dataset is None and "converter" in source and num_classes == 1000:
        dataset = IMAGENET  # converted PyTorch ImageNet weights record no dataset
    size = image_size or source.get("image_size") or IMAGENET_IMAGE_SIZE
    return EvalPreprocessing(dataset, int(size), default_augment(dataset) if dataset else AugmentConfig())


def _tensorflow() -> Any:
    """TensorFlow, which decodes the images; without it, the viz extra named."""
    require("Reading image files (ca_flax.predict, ca_flax.visualize)", "viz", ("tensorflow",))
    from ca_flax.data._tf import tf

    return tf


@functools.lru_cache(maxsize=8)
def _preprocess_fn(image_size: int, augment: AugmentConfig) -> Any:
    """``preprocess_eval`` as one traced TensorFlow function per setting."""
    tf = _tensorflow()
    from ca_flax.data.preprocess import preprocess_eval

    return tf.function(lambda data: preprocess_eval(data, image_size, augment),
                       input_signature=[tf.TensorSpec([], tf.string)])


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The file's bytes; :class:`ImageError` for a missing file, a directory, an empty
    or unreadable file."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file.")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image file.")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageError(f"{path}: cannot be read ({error.strerror or error}).") from None
    if not data:
        raise ImageError(f"{path}: is empty, not an image.")
    return data


def read_image(path: str | os.PathLike[str], preprocessing: EvalPreprocessing) -> tuple[np.ndarray, str | None]:
    """``(image, note)``: the file as the model sees it, float32 ``(size, size, 3)``
    normalized, and a note on any channel conversion (None when it was RGB).

    Raises :class:`ImageError` with a one-line message for anything that is not a
    decodable image.
    """
    tf = _tensorflow()

    data = read_bytes(path)
    try:
        channels = int(tf.io.decode_image(data, expand_animations=False).shape[-1])
        image = _preprocess_fn(preprocessing.image_size, preprocessing.augment)(tf.constant(data)).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, tf.errors.DataLossError):
        raise ImageError(f"{path}: not an image that can be decoded ({FORMATS}), or a damaged one.") from None
    return image, _CHANNEL_NOTES.get(channels)


def to_display(image: np.ndarray) -> np.ndarray:
    """A normalized image (ImageNet mean/std) back to RGB in [0, 1], for drawing."""
    rgb = np.asarray(image, np.float32) * np.asarray(STDDEV_RGB, np.float32) + np.asarray(MEAN_RGB, np.float32)
    return np.clip(rgb / 255.0, 0.0, 1.0)
