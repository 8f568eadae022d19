"""The one place that imports TensorFlow for ``ca_flax.data``.

tf.data only runs on the host: TensorFlow is kept off the GPUs so that it neither grabs
their memory nor competes with JAX for them. Quiet INFO logs unless the user set a level.
Without TensorFlow (a core install) the import error names the extra that brings it.
"""

from __future__ import annotations

import os

from ca_flax._extras import require

require("ca_flax.data (the input pipeline)", "train", ("tensorflow",))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import tensorflow as tf  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow was initialised by someone else first: leave it as it is.
    pass

__all__ = ["tf"]
