"""Class names for a checkpoint's outputs, from what is installed (never downloaded).

* ``digits``: ``'0'`` .. ``'9'``.
* ``folder``: the class folder names (needs the ``data_dir`` it was trained on).
* a TFDS dataset: ``features['label'].names`` (builders know them without the data).
* ImageNet (``imagenet2012``, or converted PyTorch weights with 1000 classes): the 1000
  human-readable names that ship inside ``tensorflow_datasets`` (the SI-Score dataset's
  copy of the standard list, in class-index order), the first synonym of each
  (``'tench'``, ``'goldfish'``, ...); failing that, TFDS's WordNet ids.

Unknown names are None: the index is then all there is.
"""

from __future__ import annotations

import os
from typing import Sequence

from ca_flax.viz.images import IMAGENET

Names = tuple[str | None, ...]


def imagenet_names() -> tuple[str, ...] | None:
    """ImageNet's 1000 class names in index order, or None when the list is not installed."""
    try:
        from tensorflow_datasets.datasets.siscore.labels import IMAGENET_LABELS_LIST
    except ImportError:
        IMAGENET_LABELS_LIST = None
    if IMAGENET_LABELS_LIST is not None and len(IMAGENET_LABELS_LIST) == 1000:
        return tuple(name.split(",")[0].strip() for name in IMAGENET_LABELS_LIST)
    ids = _tfds_names(IMAGENET, None)  # WordNet ids, e.g. 'n01440764'
    return ids if ids and len(ids) == 1000 else None


def _tfds_names(dataset: str, data_dir: str | os.PathLike[str] | None) -> tuple[str, ...] | None:
    try:
        import tensorflow_datasets as tfds

        label = tfds.builder(dataset, data_dir=os.fspath(data_dir) if data_dir else None).info.features["label"]
        return tuple(label.names) or None
    except Exception:  # unknown builder, no metadata, no 'label': names are optional
        return None


def class_names(dataset: str | None, num_classes: int, data_dir: str | os.PathLike[str] | None = None) -> Names:
    """``num_classes`` names (None where unknown) for a model trained on ``dataset``."""
    names: Sequence[str] | None = None
    base = (dataset or "").split(":")[0].split("/")[0]
    if base == "digits":
        names = tuple(str(i) for i in range(10))
    elif base == "folder":
        if data_dir is not None:
            from ca_flax.data import dataset_info

            try:
                names = dataset_info("folder", data_dir).class_names
            except ValueError:
                names = None
    elif base == IMAGENET:
        names = imagenet_names()
    elif base:
        names = _tfds_names(dataset, data_dir)
    if names is None or len(names) != num_classes:
        return (None,) * num_classes
    return tuple(names)
