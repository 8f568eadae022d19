"""The paper's recipe on a TPU pod slice: bfloat16 compute, batch 4096 with the
learning rate scaled linearly (0.05 * 4096 / 256 = 0.8) and 5 warmup epochs, as large
batch SGD needs. Launch the same command on every host; jax.distributed finds the pod.

    python train.py --config=configs/tpu.py --workdir=gs://BUCKET/run --config.data_dir=gs://BUCKET/tfds
"""

import ml_collections

from configs import imagenet_mbv2_ca


def get_config(variant: str = "ca") -> ml_collections.ConfigDict:
    config = imagenet_mbv2_ca.get_config(variant)
    config.dtype = "bfloat16"
    config.batch_size = 4096
    config.eval_batch_size = 4096
    config.warmup_epochs = 5.0
    config.eval_every_steps = 312  # one epoch at batch 4096
    config.checkpoint_every_steps = 312
    return config
