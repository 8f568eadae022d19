"""Eval-mode micro-batches inside ``model.apply`` (``models/micro_batch.py``): the outputs
and gradients of one pass over the whole batch, used only where they apply."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import numpy_variables
from ca_flax.models import create_model
from ca_flax.models import micro_batch

TINY = dict(width_mult=0.25, stage_repeats=(1, 1, 1, 1, 1, 1, 1), num_classes=10)


@pytest.fixture(scope="module")
def tiny():
    model = create_model("mobilenetv2_ca", **TINY)
    return model, numpy_variables(model, (1, 32, 32, 3))


def _images(rows):
    return jax.random.normal(jax.random.PRNGKey(rows), (rows, 32, 32, 3))


def _scans(fn, *args):
    """Whether ``fn`` loops over micro-batches (a scan in its program)."""
    return " scan[" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("setting, rows", [(3, 7), (2, 8), (8, 33), (4, 4)])
def test_micro_batched_logits_equal_one_pass(tiny, setting, rows):
    model, variables = tiny
    images = _images(rows)
    chunked = model.clone(eval_micro_batch=setting)
    whole = model.clone(eval_micro_batch=None)
    got = jax.jit(chunked.apply)(variables, images)
    assert got.shape == (rows, 10)
    assert _scans(chunked.apply, variables, images) == (rows > setting)
    np.testing.assert_allclose(got, jax.jit(whole.apply)(variables, images), rtol=1e-5, atol=1e-6)


def test_micro_batched_features_equal_one_pass(tiny):
    model, variables = tiny
    images = _images(5)
    got = jax.jit(functools.partial(model.clone(eval_micro_batch=2).apply, method="features"))(variables, images)
    want = jax.jit(functools.partial(model.clone(eval_micro_batch=None).apply, method="features"))(variables, images)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_gradients_through_micro_batches_equal_one_pass(tiny):
    """An eval-mode loss (frozen BatchNorm) differentiates through the scan."""
    model, variables = tiny
    images = _images(6)

    def grads(setting):
        m = model.clone(eval_micro_batch=setting)
        loss = lambda params: jnp.sum(m.apply({**variables, "params": params}, images) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(variables["params"])

    for got, want in zip(jax.tree_util.tree_leaves(grads(4)), jax.tree_util.tree_leaves(grads(None))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_training_init_and_recording_run_the_whole_batch(tiny):
    model, variables = tiny
    model = model.clone(eval_micro_batch=2)
    images = _images(6)
    train = functools.partial(model.apply, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
    assert not _scans(train, variables, images)
    assert not _scans(functools.partial(model.apply, mutable=["intermediates"]), variables, images)
    assert not _scans(model.init, jax.random.PRNGKey(0), images)


def test_auto_is_eight_on_one_cpu_device_and_off_elsewhere(monkeypatch):
    assert micro_batch.resolve_eval_micro_batch("auto", "cpu") == (8 if jax.device_count("cpu") == 1 else None)
    monkeypatch.setattr(micro_batch.jax, "device_count", lambda backend=None: 4)
    assert micro_batch.resolve_eval_micro_batch("auto", "cpu") is None
    assert micro_batch.resolve_eval_micro_batch("auto", "gpu") is None
    assert micro_batch.resolve_eval_micro_batch(5) == 5
    assert micro_batch.resolve_eval_micro_batch(None) is None


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "fast"])
def test_a_bad_setting_is_a_named_error(bad):
    with pytest.raises(ValueError, match="eval_micro_batch"):
        create_model("mobilenetv2_ca", eval_micro_batch=bad, **TINY)
