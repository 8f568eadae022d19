"""Where the float32 numerics paths of a training run separate, measured against float64.

Runs the same training steps (same initial parameters, same batches, same dropout keys)
three ways: float32 with the native CPU kernels, float32 with them off (XLA only), and
float64 (XLA; the reference). It prints, every ``--every`` steps:

- the loss of each path;
- each float32 path's parameter distance from the float64 run, relative to the float64
  parameters' norm (how far the trajectories have drifted apart);
- the one-step gradient error: both float32 paths' gradients at the float64 run's
  current parameters (cast to float32), relative to the float64 gradient there. This is
  the accuracy of each path by itself, free of the drift that chaos amplifies.

    python benchmarks/numerics_drift.py                    # configs/default.py, 200 steps
    python benchmarks/numerics_drift.py --steps 300 --config.learning_rate=0.4 --config.grad_clip_norm=0
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_ENABLE_X64", "1")  # the float64 reference; float32 paths stay float32
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import functools  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from ca_flax import data, native  # noqa: E402
from ca_flax.training.optim import create_optimizer, learning_rate_schedule  # noqa: E402
from ca_flax.training.state import create_train_state  # noqa: E402
from ca_flax.training.steps import cross_entropy, train_step  # noqa: E402
from ca_flax.training.trainer import build_model, plan_steps  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(_ROOT, "configs", "default.py"), "Training configuration.")
flags.DEFINE_integer("steps", 200, "Training steps to follow.")
flags.DEFINE_integer("every", 10, "Report every this many steps.")


def _relative(a, b) -> float:
    """||a - b|| / ||b|| over all leaves, in float64."""
    diff = sum(float(jnp.sum((x.astype(jnp.float64) - y.astype(jnp.float64)) ** 2))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    norm = sum(float(jnp.sum(y.astype(jnp.float64) ** 2)) for y in jax.tree_util.tree_leaves(b))
    return (diff / norm) ** 0.5


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def main(argv) -> None:
    del argv
    config = FLAGS.config
    info = data.validate_dataset(config.dataset, config.data_dir or None)
    steps_per_epoch, total_steps = plan_steps(config, info.num_train)
    tx = create_optimizer(config, learning_rate_schedule(config, steps_per_epoch, total_steps))
    rng_init, rng_train = jax.random.split(jax.random.PRNGKey(config.seed))

    def model_for(dtype: str):
        config.unlock()
        config.dtype = config.param_dtype = dtype
        return build_model(config, info.num_classes)

    model32, model64 = model_for("float32"), model_for("float64")
    shape = (1, config.image_size, config.image_size, 3)
    variables = jax.jit(functools.partial(model32.init, train=False))(rng_init, jnp.zeros(shape, jnp.float32))
    states = {
        "native": create_train_state(model32, variables, tx, rng_train),
        "xla": create_train_state(model32, variables, tx, rng_train),
        "float64": create_train_state(model64, _cast(variables, jnp.float64), tx, rng_train),
    }
    def grad_fn(state, batch):
        def loss(params):
            logits, _ = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                                       train=True, mutable=["batch_stats"],
                                       rngs={"dropout": jax.random.fold_in(state.rng, state.step)})
            return jnp.mean(cross_entropy(logits, batch["label"], info.num_classes, config.label_smoothing))
        return jax.grad(loss)(state.params)

    # Native kernels are chosen when a function is traced (the XLA path is traced inside
    # native.disabled()), so each path gets function objects of its own: jit's trace cache
    # is keyed by the function, not by that switch.
    steps = {name: jax.jit(functools.partial(train_step, num_classes=info.num_classes,
                                             label_smoothing=config.label_smoothing)) for name in states}
    grads = {name: jax.jit(functools.partial(grad_fn)) for name in states}
    batches = data.train_batches(config.dataset, data_dir=config.data_dir or None, image_size=config.image_size,
                                 global_batch_size=config.batch_size, seed=config.seed,
                                 augment=data.AugmentConfig(**dict(config.augment)) if config.get("augment") else None)

    print(f"{'step':>5} {'loss native':>12} {'loss xla':>10} {'loss f64':>10} | {'drift native':>12} "
          f"{'drift xla':>10} | {'grad err native':>15} {'grad err xla':>12}")
    for step in range(1, FLAGS.steps + 1):
        batch = next(batches)
        batch64 = {"image": jnp.asarray(batch["image"], jnp.float64), "label": jnp.asarray(batch["label"])}
        report = step % FLAGS.every == 0 or step == 1
        if report:
            # Both float32 paths' gradients at the float64 run's parameters, before its step.
            at64 = states["float64"].replace(params=_cast(states["float64"].params, jnp.float32),
                                             batch_stats=_cast(states["float64"].batch_stats, jnp.float32))
            at64 = at64.replace(apply_fn=states["native"].apply_fn)
            g64 = grads["float64"](states["float64"], batch64)
            g_native = grads["native"](at64, batch)
            with native.disabled():
                g_xla = grads["xla"](at64, batch)
            grad_err = (_relative(g_native, g64), _relative(g_xla, g64))
        losses = {}
        for name, state in states.items():
            if name == "xla":
                with native.disabled():
                    states[name], metrics = steps[name](state, batch)
            else:
                states[name], metrics = steps[name](state, batch64 if name == "float64" else batch)
            losses[name] = float(metrics["loss"])
        if report:
            ref = states["float64"].params
            print(f"{step:>5} {losses['native']:>12.4f} {losses['xla']:>10.4f} {losses['float64']:>10.4f} | "
                  f"{_relative(states['native'].params, ref):>12.2e} {_relative(states['xla'].params, ref):>10.2e} | "
                  f"{grad_err[0]:>15.2e} {grad_err[1]:>12.2e}", flush=True)


if __name__ == "__main__":
    app.run(main)
