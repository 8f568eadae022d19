"""Train and evaluate a ca-flax model.

    python train.py                                            # configs/default.py, offline
    python train.py --config=configs/imagenet_mbv2_ca.py:se --workdir=/runs/se --config.data_dir=...
    python train.py ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0

Rerunning the same command resumes from the workdir's latest checkpoint.
"""

from __future__ import annotations

import os
import sys

# TensorFlow (the input pipeline) logs C++ banners at import; keep the console for training.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(_HERE, "configs", "default.py")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events (default: ./workdirs/<config>).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process run without a cluster manager.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_string("compilation_cache_dir", None, "Persistent XLA compilation cache (default: WORKDIR/.jax_cache).")


def _default_workdir() -> str:
    config_path = FLAGS["config"].value if FLAGS["config"].present else DEFAULT_CONFIG
    name = os.path.splitext(os.path.basename(str(config_path).split(":")[0]))[0]
    return os.path.join("workdirs", name)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
    # Imported after flag parsing: JAX must see XLA_FLAGS and the distributed setup first.
    import jax

    from ca_flax.training import parallel
    from ca_flax.training.trainer import NonFiniteLossError, train_and_evaluate

    workdir = FLAGS.workdir or _default_workdir()
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir or os.path.join(workdir, ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    try:
        parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        train_and_evaluate(FLAGS.config, workdir)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as error:
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2 if not isinstance(error, NonFiniteLossError) else 3)
    print(f"Workdir: {os.path.abspath(workdir)} (metrics.jsonl, tensorboard/, checkpoints/)")


if __name__ == "__main__":
    app.run(main)
