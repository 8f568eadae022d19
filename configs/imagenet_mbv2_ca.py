"""The paper's ImageNet recipe for MobileNetV2 + Coordinate Attention.

SGD momentum 0.9, weight decay 4e-5, cosine schedule, 200 epochs, batch 256, learning
rate 0.05 at batch 256 (scaled linearly), no label smoothing, random resized crop and
flip, 224x224 (see the paper and the authors' README). The baseline and the SE and CBAM
variants of the paper's table are one flag away:

    python train.py --config=configs/imagenet_mbv2_ca.py --workdir=... --config.data_dir=gs://...
    python train.py --config=configs/imagenet_mbv2_ca.py:se ...     # or :baseline, :cbam, :ca
    python train.py --config=configs/imagenet_mbv2_ca.py --config.model=mobilenetv2_cbam ...
"""

import ml_collections

from configs import default

VARIANTS = {"ca": "mobilenetv2_ca", "se": "mobilenetv2_se", "cbam": "mobilenetv2_cbam", "baseline": "mobilenetv2"}


def get_config(variant: str = "ca") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; choose one of {sorted(VARIANTS)}.")
    config = default.get_config()
    config.model = VARIANTS[variant]
    config.model_kwargs.width_mult = 1.0
    config.dataset = "imagenet2012"
    config.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS dir with prepared imagenet2012, local or gs://
    config.image_size = 224
    config.augment = ml_collections.ConfigDict(
        {"area_range": (0.08, 1.0), "aspect_range": (0.75, 1.3333), "flip": True, "color_jitter": 0.0}
    )
    config.batch_size = 256
    config.eval_batch_size = 512  # power-of-two device counts divide it; the last batch is padded
    config.num_epochs = 200
    config.learning_rate = 0.05
    config.momentum = 0.9
    config.weight_decay = 4e-5
    config.warmup_epochs = 0.0
    config.label_smoothing = 0.0
    config.grad_clip_norm = 0.0
    config.log_every_steps = 100
    config.eval_every_steps = 5004  # one epoch: 1,281,167 images // 256
    config.checkpoint_every_steps = 2502
    config.keep_checkpoints = 3
    return config
