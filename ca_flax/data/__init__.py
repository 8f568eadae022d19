"""Input pipeline for the trainer: tf.data on the host, numpy batches out.

>>> from ca_flax.data import dataset_info, train_batches, eval_batches
>>> info = dataset_info('digits')                      # 1437 train / 360 eval, 10 classes
>>> it = train_batches('digits', data_dir=None, image_size=32, global_batch_size=128, seed=0)
>>> batch = next(it)                                   # {'image': [128, 32, 32, 3], 'label': [128]}
>>> for batch in eval_batches('digits', data_dir=None, image_size=32, global_batch_size=128):
...     ...                                            # + 'mask': False on padding rows

Datasets: ``'digits'`` (scikit-learn's bundled digits, offline), ``'folder'``
(``data_dir/{train,val}/<class>/<image>``) and prepared TensorFlow Datasets builders
(``'imagenet2012'``, ``'cifar10'``, ``'mnist'``, ...). All go through the same
decode / crop / resize / normalize code (``ca_flax.data.preprocess``). See
``ca_flax.data.pipeline`` for the determinism and multi-process scheme.

``AugmentConfig``, ``DatasetInfo`` and ``default_augment`` are plain Python; everything
else imports TensorFlow on first use, so importing this package stays cheap. The pipeline
needs the ``train`` extra (``pip install 'ca-flax[train]'``: TensorFlow, TFDS,
scikit-learn for digits); without it, first use raises an ImportError naming the extra.
"""

from __future__ import annotations

import importlib
from typing import Any

from ca_flax.data.config import MEAN_RGB, STDDEV_RGB, AugmentConfig, DatasetInfo, default_augment

_LAZY = {
    "dataset_info": "ca_flax.data.pipeline",
    "validate_dataset": "ca_flax.data.pipeline",
    "train_batches": "ca_flax.data.pipeline",
    "eval_batches": "ca_flax.data.pipeline",
    "train_dataset": "ca_flax.data.pipeline",
    "eval_dataset": "ca_flax.data.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ca_flax.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "MEAN_RGB",
    "STDDEV_RGB",
    "AugmentConfig",
    "DatasetInfo",
    "dataset_info",
    "default_augment",
    "eval_batches",
    "eval_dataset",
    "train_batches",
    "train_dataset",
    "validate_dataset",
]
