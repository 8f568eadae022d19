"""Where the encoded images come from: scikit-learn's digits, an image folder, or TFDS.

Every source hands the pipeline ``(encoded image bytes, int32 label)`` pairs; decoding
and augmentation happen later, in ``preprocess``, identically for all of them.

Two kinds of source:

* :class:`IndexedSource` (``'digits'``, ``'folder'``): the split is a list held in memory
  (PNG bytes, or file paths read with ``tf.io.read_file``), addressed by example index,
  so an epoch's order is an exact permutation and any position is reachable in O(1).
* :class:`StreamSource` (TFDS): the split is a ``tf.data`` stream of records in a fixed
  order; an epoch's order comes from a seeded shuffle buffer.

Opening a source only lists files / reads metadata: no image is read or decoded.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np

from ca_flax._extras import message, require
from ca_flax.data._tf import tf
from ca_flax.data.config import DatasetInfo

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Digits: 80% train / 20% held out, from one fixed permutation.
DIGITS_TRAIN_FRACTION = 0.8
DIGITS_SPLIT_SEED = 0

# TFDS splits whose encoded records total at most this many bytes are cached in memory
# after the first epoch (MNIST, CIFAR: tens of MB); larger ones are re-read from disk.
TFDS_CACHE_MAX_BYTES = 512 * 2**20


@dataclasses.dataclass(frozen=True)
class IndexedSource:
    """Splits held in memory as arrays, read by index.

    Attributes:
      info: the dataset's metadata.
      images: split name -> 1-D array of encoded image bytes (``encoded=True``) or file
        paths (``encoded=False``).
      labels: split name -> 1-D int32 array of labels.
      encoded: whether ``images`` are the bytes themselves or paths to read.
    """

    info: DatasetInfo
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    encoded: bool

    def num_examples(self, split: str) -> int:
        return len(self.labels[split])

    def describe(self, split: str, index: int) -> str:
        """Where example ``index`` of ``split`` comes from: its file, or its index."""
        if self.encoded:
            return f"{self.info.name!r} {split} example {index}"
        return str(self.images[split][index])

    def reader(self, split: str):
        """Returns ``read(index) -> (image_bytes, label)`` for int64 index tensors."""
        images = tf.constant(self.images[split], tf.string)
        labels = tf.constant(self.labels[split], tf.int32)
        encoded = self.encoded

        def read(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            image = tf.gather(images, index)
            if not encoded:
                image = tf.io.read_file(image)
            return image, tf.gather(labels, index)

        return read


@dataclasses.dataclass(frozen=True)
class StreamSource:
    """A prepared TFDS dataset, read as a stream of still-encoded records.

    Attributes:
      info: the dataset's metadata.
      builder: the ``tfds`` builder (``download_and_prepare`` is never called).
      cache: keep the encoded records in memory after the first pass.
    """

    info: DatasetInfo
    builder: object
    cache: bool

    def num_examples(self, split: str) -> int:
        return self.info.num_train if split == self.info.train_split else self.info.num_eval

    def stream(self, split: str) -> tf.data.Dataset:
        """``(image_bytes, label)`` in the split's fixed, deterministic record order."""
        import tensorflow_datasets as tfds

        ds = self.builder.as_dataset(
            split=split,
            shuffle_files=False,  # The pipeline shuffles, deterministically per epoch.
            decoders={"image": tfds.decode.SkipDecoding()},  # Decode fused with the crop later.
            read_config=tfds.ReadConfig(try_autocache=False, skip_prefetch=True),
        )
        ds = ds.map(tf.autograph.experimental.do_not_convert(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32))))
        return ds.cache() if self.cache else ds


Source = IndexedSource | StreamSource


def open_source(name: str, data_dir: str | os.PathLike | None = None) -> Source:
    """Opens dataset ``name``: ``'digits'``, ``'folder'`` (needs ``data_dir``) or a TFDS builder name.

    Raises:
      ValueError: unknown name, missing or malformed directory, or unprepared TFDS data;
        the message says what was searched and how to fix it.
    """
    data_dir = data_dir or None  # '' (e.g. --config.data_dir=) means unset, as None does.
    if name == "digits":
        return _digits()
    if name == "folder":
        return _folder(data_dir)
    return _tfds(name, data_dir)


# ---------------------------------------------------------------------------------------
# digits


@functools.lru_cache(maxsize=1)
def _digits() -> IndexedSource:
    """scikit-learn's 1797 bundled 8x8 digits as RGB PNGs (offline: the data ships with sklearn)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError(message("Dataset 'digits'", "train", ["sklearn"])) from e

    digits = load_digits()
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    encoded = np.array([tf.io.encode_png(image).numpy() for image in rgb], dtype=object)
    labels = digits.target.astype(np.int32)

    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    num_train = int(DIGITS_TRAIN_FRACTION * len(labels))
    train, test = order[:num_train], order[num_train:]
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        num_train=len(train),
        num_eval=len(test),
        train_split="train",
        eval_split="test",
        class_names=tuple(str(i) for i in range(10)),
    )
    return IndexedSource(
        info=info,
        images={"train": encoded[train], "test": encoded[test]},
        labels={"train": labels[train], "test": labels[test]},
        encoded=True,
    )


# ---------------------------------------------------------------------------------------
# folder

_FOLDER_LAYOUT = (
    "data_dir must hold train/ and val/, each with one subfolder per class containing "
    f"images ({', '.join(IMAGE_EXTENSIONS)}; any case), e.g. data_dir/train/cat/001.jpg."
)


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _image_files(class_dir: Path) -> list[str]:
    return sorted(
        e.path
        for e in os.scandir(class_dir)
        if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)
    )


def _list_split(split_dir: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        files = _image_files(split_dir / cls)
        if not files:
            raise ValueError(f"Class folder {split_dir / cls} has no images. {_FOLDER_LAYOUT}")
        paths += files
        labels += [label] * len(files)
    return np.array(paths, dtype=object), np.array(labels, dtype=np.int32)


def _folder(data_dir: str | os.PathLike | None) -> IndexedSource:
    """Lists ``data_dir/{train,val}/<class>/<image>``; classes are train/'s sorted subfolders."""
    if data_dir is None:
        raise ValueError(f"Dataset 'folder' needs data_dir. {_FOLDER_LAYOUT}")
    root = Path(data_dir).expanduser()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ValueError(f"Dataset 'folder': {root / split} is not a directory. {_FOLDER_LAYOUT}")
    classes = _class_dirs(root / "train")
    if not classes:
        raise ValueError(f"Dataset 'folder': {root / 'train'} has no class subfolders. {_FOLDER_LAYOUT}")
    val_classes = _class_dirs(root / "val")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise ValueError(
            f"Dataset 'folder': the class folders of {root / 'train'} and {root / 'val'} differ "
            f"(only in train: {only_train}; only in val: {only_val}). Both splits need the same classes."
        )
    train_paths, train_labels = _list_split(root / "train", classes)
    val_paths, val_labels = _list_split(root / "val", classes)
    info = DatasetInfo(
        name="folder",
        num_classes=len(classes),
        num_train=len(train_labels),
        num_eval=len(val_labels),
        train_split="train",
        eval_split="val",
        class_names=tuple(classes),
    )
    return IndexedSource(
        info=info,
        images={"train": train_paths, "val": val_paths},
        labels={"train": train_labels, "val": val_labels},
        encoded=False,
    )


# ---------------------------------------------------------------------------------------
# TFDS


def _missing(data_dir: str | None) -> str:
    """', which does not exist' for a local data_dir that does not exist (a typo'd path is the usual cause)."""
    exists = data_dir is None or "://" in data_dir or os.path.isdir(data_dir)
    return "" if exists else ", which does not exist"


def _tfds(name: str, data_dir: str | os.PathLike | None) -> StreamSource:
    """A TFDS builder over already-prepared data (never downloads or prepares)."""
    require(f"Dataset {name!r} (TensorFlow Datasets)", "train", ("tensorflow_datasets",))
    import tensorflow_datasets as tfds

    if data_dir is not None:
        data_dir = os.fspath(data_dir)
        if "://" not in data_dir:  # Leave URLs (gs://...) alone: pathlib would collapse their '//'.
            data_dir = os.path.expanduser(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset {name!r}: use 'digits', 'folder' (with data_dir) or a "
            "TensorFlow Datasets builder name such as 'imagenet2012', 'cifar10', 'mnist' "
            "(tfds.list_builders() lists them)."
        ) from None

    features = builder.info.features
    for key in ("image", "label"):
        if key not in features:
            raise ValueError(
                f"TFDS dataset {name!r} has no {key!r} feature (features: {sorted(features.keys())}); "
                "only image classification datasets with 'image' and 'label' are supported."
            )

    prepare_hint = (
        f"TFDS dataset {name!r} is not prepared: no data in {builder.data_dir} "
        f"(data_dir={data_dir or 'the TFDS default, ~/tensorflow_datasets'}{_missing(data_dir)}). "
        "This pipeline never downloads; "
        f"prepare it once with `tfds build {name.split(':')[0]} --data_dir=DIR` (ImageNet: put the "
        "official tars in DIR/downloads/manual first) and pass data_dir=DIR."
    )
    splits = builder.info.splits

    def count(split: str) -> int:
        if split in splits:
            return int(splits[split].num_examples)
        # Split sizes live in the prepared metadata; without it as_dataset raises, unless the
        # records come from elsewhere (tfds.testing.mock_data), where the stream knows its size.
        try:
            ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        except (AssertionError, ValueError, KeyError, FileNotFoundError) as e:
            raise ValueError(prepare_hint) from e
        cardinality = int(ds.cardinality())
        if cardinality < 0:
            cardinality = sum(1 for _ in ds)
        return cardinality

    if splits and "train" not in splits:
        raise ValueError(f"TFDS dataset {name!r} has no 'train' split (splits: {sorted(splits)}).")
    num_train = count("train")
    if splits:
        eval_split = "validation" if "validation" in splits else "test"
        if eval_split not in splits:
            raise ValueError(
                f"TFDS dataset {name!r} has neither a 'validation' nor a 'test' split "
                f"(splits: {sorted(splits)}); it cannot be evaluated."
            )
    else:  # No split metadata (mocked records): 'validation' is the one to try first.
        eval_split = "validation"
    num_eval = count(eval_split)
    if num_train == 0 or num_eval == 0:
        raise ValueError(prepare_hint)

    label = features["label"]
    if not isinstance(label, tfds.features.ClassLabel):
        raise ValueError(f"TFDS dataset {name!r}: 'label' is a {type(label).__name__}, not a ClassLabel.")
    names = tuple(label.names) if label.names else ()
    info = DatasetInfo(
        name=name,
        num_classes=int(label.num_classes),
        num_train=num_train,
        num_eval=num_eval,
        train_split="train",
        eval_split=eval_split,
        class_names=names,
    )
    size = int(builder.info.dataset_size or 0)  # 0 when unknown (mocked data).
    return StreamSource(info=info, builder=builder, cache=0 < size <= TFDS_CACHE_MAX_BYTES)
