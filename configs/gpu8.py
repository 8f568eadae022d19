"""The paper's recipe on one host with 8 GPUs: bfloat16 compute, batch 1024 (128 per
GPU), learning rate 0.05 * 1024 / 256 = 0.2, 2 warmup epochs.

    python train.py --config=configs/gpu8.py --workdir=/data/runs/mbv2_ca --config.data_dir=/data/tfds
"""

import ml_collections

from configs import imagenet_mbv2_ca


def get_config(variant: str = "ca") -> ml_collections.ConfigDict:
    config = imagenet_mbv2_ca.get_config(variant)
    config.dtype = "bfloat16"
    config.batch_size = 1024
    config.eval_batch_size = 1024
    config.warmup_epochs = 2.0
    config.eval_every_steps = 1251  # one epoch at batch 1024
    config.checkpoint_every_steps = 1251
    return config
