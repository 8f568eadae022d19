"""Training throughput on synthetic data: the model, step and loop of a real run,
without an input pipeline. MobileNetV2+CA, batch 32, 224x224, float32 (the CPU
comparison point); raise batch_size and set dtype='bfloat16' on accelerators.

    python train.py --config=configs/fake_data_benchmark.py --workdir=/tmp/bench
    jq 'select(.images_per_sec) | .images_per_sec' /tmp/bench/metrics.jsonl
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model = "mobilenetv2_ca"
    config.model_kwargs.width_mult = 1.0
    config.dataset = "fake"
    config.image_size = 224
    config.batch_size = 32
    config.eval_batch_size = 32
    config.num_train_steps = 40
    config.learning_rate = 0.05
    config.warmup_epochs = 0.0
    # The step PyTorch's training loop is compared with: no clipping, no smoothing.
    config.grad_clip_norm = 0.0
    config.label_smoothing = 0.0
    config.log_every_steps = 8  # a multiple of 8: eight steps per compiled call on CPU
    config.eval_every_steps = 1_000_000  # only the final one-batch evaluation
    config.checkpoint_every_steps = 1_000_000  # only the final checkpoint
    config.keep_checkpoints = 1
    return config
