"""Plain-Python settings and metadata of the input pipeline (no TensorFlow import)."""

from __future__ import annotations

import dataclasses
import math

# ImageNet statistics on the 0..255 scale, in RGB order (the torchvision / timm constants).
MEAN_RGB: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)

RESIZE_METHODS = ("bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Train augmentation and eval crop settings.

    Attributes:
      area_range: fraction of the image area a random crop covers (Inception crop).
      aspect_range: width / height of a random crop.
      flip: random horizontal flip in training.
      eval_crop_fraction: evaluation takes the central ``eval_crop_fraction * min(h, w)``
        square, i.e. resizes the shorter side to ``image_size / eval_crop_fraction`` and
        center-crops ``image_size`` (0.875: 256 -> 224, the standard ImageNet protocol).
      resize_method: ``'bilinear'`` or ``'bicubic'`` (antialiased when downscaling).
      max_attempts: tries of the crop sampler before falling back to a center crop.
      color_jitter: strength ``s`` of a random brightness, contrast and saturation change
        in training, each by a factor drawn from ``[1 - s, 1 + s]`` and applied in random
        order (torchvision's ``ColorJitter(s, s, s)``, timm's ``--color-jitter``); 0: none.
    """

    area_range: tuple[float, float] = (0.08, 1.0)
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    eval_crop_fraction: float = 0.875
    resize_method: str = "bilinear"
    max_attempts: int = 10
    color_jitter: float = 0.0

    def __post_init__(self):
        lo, hi = self.area_range
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"area_range must satisfy 0 < low <= high <= 1, got {self.area_range}.")
        lo, hi = self.aspect_range
        if not 0.0 < lo <= hi:
            raise ValueError(f"aspect_range must satisfy 0 < low <= high, got {self.aspect_range}.")
        if not 0.0 < self.eval_crop_fraction <= 1.0:
            raise ValueError(f"eval_crop_fraction must be in (0, 1], got {self.eval_crop_fraction}.")
        if self.resize_method not in RESIZE_METHODS:
            raise ValueError(f"resize_method must be one of {RESIZE_METHODS}, got {self.resize_method!r}.")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}.")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1) (0.4 is timm's usual strength), got {self.color_jitter}.")


# Handwritten digits: a flip changes the class (2 vs 5 ...) and the images are tiny (8x8,
# 28x28), so crops stay large and the eval view is the whole image.
_DIGIT_LIKE = ("digits", "mnist", "emnist", "kmnist")
_DIGIT_AUGMENT = AugmentConfig(area_range=(0.5, 1.0), flip=False, eval_crop_fraction=1.0)


def default_augment(name: str) -> AugmentConfig:
    """The augmentation ``train_batches``/``eval_batches`` use for ``name`` when given none."""
    base = name.split(":")[0].split("/")[0]
    return _DIGIT_AUGMENT if base in _DIGIT_LIKE else AugmentConfig()


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a dataset before reading it.

    Attributes:
      name: the dataset name as given (``'digits'``, ``'folder'`` or a TFDS builder name).
      num_classes: number of labels; labels are ``0 .. num_classes - 1``.
      num_train: examples in the training split.
      num_eval: examples in the evaluation split.
      train_split: name of the training split.
      eval_split: name of the evaluation split (``'validation'`` if the TFDS dataset has
        one, else ``'test'``; ``'val'`` for folders; ``'test'`` for digits' held-out 20%).
      class_names: label names where known (folder names for ``'folder'``), else empty.
    """

    name: str
    num_classes: int
    num_train: int
    num_eval: int
    train_split: str
    eval_split: str
    class_names: tuple[str, ...] = ()

    def steps_per_epoch(self, global_batch_size: int) -> int:
        """Train steps per epoch: ``num_train // global_batch_size`` (the remainder is dropped)."""
        return self.num_train // global_batch_size

    def eval_steps(self, global_batch_size: int) -> int:
        """Batches of one eval pass: ``ceil(num_eval / global_batch_size)`` (the last one padded)."""
        return math.ceil(self.num_eval / global_batch_size)
