"""Full-model inference and train-step throughput per depthwise implementation.

    python benchmarks/model.py [--model mobilenetv2_ca] [--batch 32] [--image-size 224] [--steps 5]

Runs every depthwise implementation of the same network on the same batch in one
process and prints images/s and compile seconds side by side. The train step is a plain
SGD step on cross-entropy with BatchNorm in training mode (the shape of the trainer's
step, without its data pipeline). Compare ratios within one run: absolute numbers move
with the machine's load.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ca_flax.layers import DEPTHWISE_IMPLEMENTATIONS, resolve_impl
from ca_flax.models import create_model


def _throughput(fn, args, batch: int, steps: int) -> tuple[float, float]:
    """(compile seconds, images per second over ``steps`` calls after one warm-up)."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    out = compiled(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        out = compiled(*args)
    jax.block_until_ready(out)
    return compile_s, batch * steps / (time.perf_counter() - start)


def _variables(model, shape, seed=0):
    """Random variables from shapes alone: running the initializers compiles slowly on CPU."""
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    gen = np.random.default_rng(seed)

    def fill(path, leaf):
        if path[-1].key == "var":
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(0.05 * gen.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def sgd_train_setup(model, batch: int, size: int):
    """``(train_step, args)``: a plain SGD-with-momentum step on cross-entropy with
    BatchNorm in training mode, and its arguments ``(params, batch_stats, opt_state,
    images, labels)`` for random inputs (also used by ``profile_step.py``)."""
    shape = (batch, size, size, 3)
    variables = _variables(model, shape)
    images = jax.random.normal(jax.random.PRNGKey(1), shape)
    labels = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 1000)
    tx = optax.sgd(0.01, momentum=0.9)

    def train_step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            logits, state = model.apply(
                {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"],
                rngs={"dropout": jax.random.PRNGKey(0)},
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
            return loss, state["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return train_step, (variables["params"], variables["batch_stats"], tx.init(variables["params"]), images, labels)


def bench(name: str, impl: str, batch: int, size: int, steps: int, dtype) -> dict[str, float]:
    model = create_model(name, depthwise_impl=impl, dtype=dtype)
    train_step, (params, batch_stats, opt_state, images, labels) = sgd_train_setup(model, batch, size)
    variables = {"params": params, "batch_stats": batch_stats}
    infer = jax.jit(functools.partial(model.apply, train=False))

    step = jax.jit(train_step, donate_argnums=(0, 1, 2))
    infer_compile, infer_ips = _throughput(infer, (variables, images), batch, steps)
    # Donation consumes the buffers: give the train step its own copies.
    args = jax.tree_util.tree_map(jnp.copy, (variables["params"], variables["batch_stats"], opt_state))
    start = time.perf_counter()
    compiled = step.lower(*args, images, labels).compile()
    train_compile = time.perf_counter() - start
    params, stats, opt = compiled(*args, images, labels)[:3]
    jax.block_until_ready(params)
    start = time.perf_counter()
    for _ in range(steps):
        params, stats, opt, loss = compiled(params, stats, opt, images, labels)
    jax.block_until_ready(loss)
    train_ips = batch * steps / (time.perf_counter() - start)
    return dict(infer_compile=infer_compile, infer_ips=infer_ips, train_compile=train_compile, train_ips=train_ips)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenetv2_ca")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--impls", default=",".join(DEPTHWISE_IMPLEMENTATIONS))
    args = parser.parse_args()
    print(f"{args.model} batch={args.batch} {args.image_size}x{args.image_size} {args.dtype} "
          f"backend={jax.default_backend()} ({jax.devices()[0].device_kind}), auto={resolve_impl('auto')}")
    print(f"{'depthwise impl':<16}{'infer img/s':>14}{'infer compile':>16}{'train img/s':>14}{'train compile':>16}")
    for impl in args.impls.split(","):
        r = bench(args.model, impl, args.batch, args.image_size, args.steps, jnp.dtype(args.dtype))
        print(f"{impl:<16}{r['infer_ips']:>14.1f}{r['infer_compile']:>15.1f}s{r['train_ips']:>14.2f}{r['train_compile']:>15.1f}s",
              flush=True)


if __name__ == "__main__":
    main()
