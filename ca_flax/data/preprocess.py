"""Image preprocessing on encoded bytes: one code path for every source and format.

Train: an Inception-style random resized crop (``stateless_sample_distorted_bounding_box``),
resize, optional horizontal flip, optional color jitter, normalization. Eval: the central
``eval_crop_fraction * min(h, w)`` square, resized to ``image_size`` (the same as resizing
the shorter side to ``image_size / eval_crop_fraction`` and center-cropping, as in flax's
ImageNet example with ``CROP_PADDING = 32``), normalization.

The crop window is computed from the image's shape before decoding, so JPEGs are decoded
with the crop fused in (``decode_and_crop_jpeg`` only decodes the needed blocks); other
formats (PNG, GIF, BMP) are decoded whole and then cropped. All randomness is stateless:
the caller passes a ``[2]`` int64 key per example.
"""

from __future__ import annotations

from collections.abc import Callable

from ca_flax.data._tf import tf
from ca_flax.data.config import MEAN_RGB, STDDEV_RGB, AugmentConfig

WindowFn = Callable[[tf.Tensor], tf.Tensor]  # image [h, w] (int32) -> [y, x, crop_h, crop_w]


def decode_and_crop(image_bytes: tf.Tensor, window_fn: WindowFn) -> tf.Tensor:
    """Decodes ``image_bytes`` (any format TF reads) to uint8 RGB, cropped to ``window_fn(shape)``.

    Grayscale images are replicated to three channels, alpha is dropped, animations give
    their first frame.
    """

    def jpeg() -> tf.Tensor:
        window = window_fn(tf.io.extract_jpeg_shape(image_bytes)[:2])
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

    def other() -> tf.Tensor:
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        window = window_fn(tf.shape(image)[:2])
        return tf.slice(image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], 3]))

    image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def center_crop_window(shape: tf.Tensor, crop_fraction: float) -> tf.Tensor:
    """The central square of side ``int(crop_fraction * min(h, w))`` as ``[y, x, side, side]``.

    Offsets round up like flax's ``_decode_and_center_crop`` (``(h - side + 1) // 2``).
    """
    shape = tf.cast(shape, tf.int32)
    height, width = shape[0], shape[1]
    side = tf.cast(crop_fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    side = tf.maximum(side, 1)
    return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def _clamped_center_window(shape: tf.Tensor, aspect_range: tuple[float, float]) -> tf.Tensor:
    """The largest centered crop whose width / height lies in ``aspect_range`` (torchvision's fallback)."""
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    ratio = width / height
    crop_w = tf.where(ratio > aspect_range[1], tf.round(height * aspect_range[1]), width)
    crop_h = tf.where(ratio < aspect_range[0], tf.round(width / aspect_range[0]), height)
    crop_h = tf.maximum(tf.cast(crop_h, tf.int32), 1)
    crop_w = tf.maximum(tf.cast(crop_w, tf.int32), 1)
    return tf.stack([(shape[0] - crop_h) // 2, (shape[1] - crop_w) // 2, crop_h, crop_w])


def random_crop_window(
    shape: tf.Tensor,
    key: tf.Tensor,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
    max_attempts: int = 10,
) -> tf.Tensor:
    """A random Inception crop of an image of ``shape`` ``[h, w]`` as ``[y, x, crop_h, crop_w]``.

    ``area_range`` alone bounds the crop's area (``min_object_covered`` is 0, as in
    torchvision's RandomResizedCrop). When all ``max_attempts`` samples fail, the sampler
    returns the whole image; the whole image is then replaced by its largest centered crop
    with an aspect ratio inside ``aspect_range``, which leaves legitimate whole-image
    samples (possible only when the image's own aspect is in range) unchanged.
    """
    shape = tf.cast(shape, tf.int32)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_size=tf.concat([shape, [3]], axis=0),
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=key,
        min_object_covered=0.0,
        aspect_ratio_range=aspect_range,
        area_range=area_range,
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    sampled = tf.stack([begin[0], begin[1], size[0], size[1]])
    whole_image = tf.reduce_all(tf.equal(size[:2], shape))
    return tf.where(whole_image, _clamped_center_window(shape, aspect_range), sampled)


def resize(image: tf.Tensor, image_size: int, method: str = "bilinear") -> tf.Tensor:
    """Resizes to ``[image_size, image_size]`` (float32, 0..255), antialiased when shrinking."""
    image = tf.image.resize(image, [image_size, image_size], method=method, antialias=True)
    if method == "bicubic":  # Cubic interpolation overshoots.
        image = tf.clip_by_value(image, 0.0, 255.0)
    return image


# ITU-R 601 luma, the weights torchvision's rgb_to_grayscale uses.
_LUMA = (0.299, 0.587, 0.114)
# The six orders of (brightness, contrast, saturation): torchvision draws one per image.
COLOR_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(image * tf.constant(_LUMA, tf.float32), axis=-1, keepdims=True)


def _blend(image: tf.Tensor, other: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """``factor * image + (1 - factor) * other``, clipped to 0..255 (torchvision's ``_blend``)."""
    return tf.clip_by_value(factor * image + (1.0 - factor) * other, 0.0, 255.0)


def adjust_colors(image: tf.Tensor, factors: tf.Tensor, order: tuple[int, int, int]) -> tf.Tensor:
    """Brightness, contrast and saturation by ``factors[0..2]``, applied in ``order``.

    As torchvision's ``adjust_brightness`` (blend with black), ``adjust_contrast`` (with
    the mean gray level) and ``adjust_saturation`` (with the grayscale image), each
    clipped to 0..255.
    """
    adjust = (
        lambda x: _blend(x, tf.zeros_like(x), factors[0]),
        lambda x: _blend(x, tf.reduce_mean(_grayscale(x)), factors[1]),
        lambda x: _blend(x, _grayscale(x), factors[2]),
    )
    for which in order:
        image = adjust[which](image)
    return image


def color_jitter(image: tf.Tensor, key: tf.Tensor, strength: float) -> tf.Tensor:
    """torchvision's ``ColorJitter(strength, strength, strength)`` on a float 0..255 RGB image:
    :func:`adjust_colors` with factors drawn uniformly from ``[1 - strength, 1 + strength]``
    in one of the six orders drawn at random; a pure function of ``(image, key)``."""
    factor_key, order_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    factors = tf.random.stateless_uniform([3], factor_key, 1.0 - strength, 1.0 + strength)
    which = tf.random.stateless_uniform([], order_key, 0, len(COLOR_ORDERS), dtype=tf.int32)
    branches = [lambda order=order: adjust_colors(image, factors, order) for order in COLOR_ORDERS]
    return tf.switch_case(which, branches)


def normalize(image: tf.Tensor) -> tf.Tensor:
    """Subtracts the ImageNet mean and divides by its std (both on the 0..255 scale)."""
    image = tf.cast(image, tf.float32)
    return (image - tf.constant(MEAN_RGB, tf.float32)) / tf.constant(STDDEV_RGB, tf.float32)


def preprocess_train(image_bytes: tf.Tensor, key: tf.Tensor, image_size: int, augment: AugmentConfig) -> tf.Tensor:
    """Random resized crop, resize, optional flip and color jitter, normalize: float32
    ``[image_size, image_size, 3]``.

    Args:
      image_bytes: a scalar string tensor, the encoded image (JPEG, PNG, GIF or BMP).
      key: ``[2]`` int64 stateless seed; the output is a pure function of (bytes, key).
      image_size: output side.
      augment: crop ranges, flip, color jitter, resize method.
    """
    crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))

    def window_fn(shape: tf.Tensor) -> tf.Tensor:
        return random_crop_window(shape, crop_key, augment.area_range, augment.aspect_range, augment.max_attempts)

    image = resize(decode_and_crop(image_bytes, window_fn), image_size, augment.resize_method)
    if augment.flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_key)
    if augment.color_jitter:
        # Folded in, not split off: turning jitter on leaves the crops and flips as they were.
        image = color_jitter(image, tf.random.experimental.stateless_fold_in(key, 2), augment.color_jitter)
    return normalize(image)


def preprocess_eval(image_bytes: tf.Tensor, image_size: int, augment: AugmentConfig) -> tf.Tensor:
    """Central crop (``augment.eval_crop_fraction``), resize, normalize: float32 ``[image_size, image_size, 3]``."""
    image = decode_and_crop(image_bytes, lambda shape: center_crop_window(shape, augment.eval_crop_fraction))
    return normalize(resize(image, image_size, augment.resize_method))
