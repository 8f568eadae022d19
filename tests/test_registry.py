"""Every registered model, at a tiny size, through what every family promises.

timm's way: a new family is tested by registering it. Each model keeps its variant's
settings except depth and width (one block per stage, width 0.25), and runs on 32x32
images: init, eval apply, train apply with BatchNorm updates, gradients, ``features``
keys, strides and channels as ``feature_info`` says, the fused CPU path against the
plain modules (``ca_flax.fast_paths.disabled()``), and save/restore through
``ca_flax.checkpoints``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ca_flax import checkpoints, fast_paths
from ca_flax.models import Backbone, create_model, list_models

SIZE = 32


def tiny(name: str) -> Backbone:
    model = create_model(name, num_classes=10)
    fields = {f.name for f in dataclasses.fields(model)}
    # Depth and width: the knobs every family has (a new family without them fails
    # here and should say how it shrinks).
    shrink = {"width_mult": 0.25}
    if "stage_repeats" in fields:
        shrink["stage_repeats"] = (1,) * len(model.stage_repeats)
    return create_model(name, num_classes=10, **shrink)


@pytest.mark.parametrize("name", list_models())
def test_registered_model(name, tmp_path):
    model = tiny(name)
    assert isinstance(model, Backbone)
    assert (model.num_classes, model.dtype, jnp.dtype(model.param_dtype)) == (10, None, jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, SIZE, SIZE, model.in_channels))
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    assert set(variables) == {"params", "batch_stats"}

    # Eval: logits and feature maps, fused (CPU fast paths on) and plain.
    def evaluate(v, x):
        return model.apply(v, x), model.apply(v, x, method=model.features)

    logits, maps = jax.jit(evaluate)(variables, x)
    with fast_paths.disabled():
        plain_logits, plain_maps = jax.jit(evaluate)(variables, x)
    assert logits.shape == (3, 10) and bool(jnp.all(jnp.isfinite(logits)))
    scale = float(jnp.max(jnp.abs(plain_logits)))
    np.testing.assert_allclose(logits, plain_logits, rtol=0, atol=1e-5 * scale)
    info = model.feature_info()
    assert list(maps) == sorted(i.name for i in info) and len({i.name for i in info}) == len(info)
    for item in info:
        assert maps[item.name].shape == (3, -(-SIZE // item.stride), -(-SIZE // item.stride), item.channels), item
        np.testing.assert_allclose(maps[item.name], plain_maps[item.name], rtol=1e-4, atol=1e-4)
    assert [i.stride for i in info] == sorted(i.stride for i in info) and info[-1].stride == 32

    # Train: batch statistics move, every parameter gets a gradient.
    labels = jnp.arange(3) % 10

    def loss(params, v, x):
        out, updates = model.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": jax.random.PRNGKey(2)})
        return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean(), updates

    (value, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"], variables, x)
    assert np.isfinite(float(value))
    moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], variables["batch_stats"])
    assert all(jax.tree_util.tree_leaves(moved))
    silent = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0] if not jnp.any(g != 0)]
    assert not silent, f"parameters without gradient: {silent[:5]}"

    # Save and restore: same module, same variables, same logits.
    checkpoints.save_model(tmp_path / "model", model, variables)
    restored, loaded = checkpoints.load_model(tmp_path / "model")
    assert restored == model
    same = jax.tree_util.tree_map(np.array_equal, jax.device_get(variables), jax.device_get(loaded))
    assert all(jax.tree_util.tree_leaves(same))
    np.testing.assert_array_equal(jax.jit(evaluate)(loaded, x)[0], logits)
