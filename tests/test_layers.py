"""The hand-written backward passes of the fast paths equal plain autodiff.

BatchNorm (statistics with a custom gradient, normalization + activation recomputed in
the backward pass) and the pointwise matmul are checked in float64 against the same
math written without any of it, in training mode, so the memory and speed work changes
no gradient beyond rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ca_flax.layers import BatchNorm
from ca_flax.layers.activations import hard_swish, relu6
from ca_flax.layers.conv import ConvBNAct, pointwise_matmul
from ca_flax.layers.norm import batch_moments



@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def reference_batch_norm(x, scale, bias, activation, eps=1e-5):
    """BatchNorm in training mode, two-pass variance, differentiated by plain autodiff."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    y = (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias
    return activation(y) if activation is not None else y


@pytest.mark.parametrize("activation", [None, relu6, hard_swish])
def test_batch_norm_gradients_equal_plain_autodiff(activation):
    gen = np.random.default_rng(0)
    x = jnp.asarray(2.0 * gen.standard_normal((4, 5, 6, 7)) + 0.5)
    cotangent = jnp.asarray(gen.standard_normal(x.shape))
    module = BatchNorm(activation=activation, dtype=jnp.float64, param_dtype=jnp.float64)
    variables = module.init(jax.random.PRNGKey(0), x, use_running_average=False)
    params = {"scale": jnp.asarray(gen.uniform(0.5, 1.5, 7)), "bias": jnp.asarray(gen.standard_normal(7))}

    def ours(x, params):
        y, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            use_running_average=False, mutable=["batch_stats"])
        return jnp.sum(y * cotangent)

    def reference(x, params):
        return jnp.sum(reference_batch_norm(x, params["scale"], params["bias"], activation) * cotangent)

    np.testing.assert_allclose(ours(x, params), reference(x, params), rtol=1e-13)
    got, want = jax.grad(ours, argnums=(0, 1))(x, params), jax.grad(reference, argnums=(0, 1))(x, params)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_batch_moments_gradient_and_dtype():
    gen = np.random.default_rng(1)
    x = jnp.asarray(gen.standard_normal((3, 4, 4, 5)))
    mean, var = batch_moments(x, (0, 1, 2))
    np.testing.assert_allclose(var, np.var(np.asarray(x), axis=(0, 1, 2)), rtol=1e-13)

    def loss(fn, x):
        m, v = fn(x)
        return jnp.sum(jnp.sin(m) + v * jnp.arange(5.0))

    plain = lambda x: (jnp.mean(x, (0, 1, 2)), jnp.var(x, (0, 1, 2)))
    np.testing.assert_allclose(jax.grad(lambda x: loss(lambda y: batch_moments(y, (0, 1, 2)), x))(x),
                               jax.grad(lambda x: loss(plain, x))(x), rtol=1e-10, atol=1e-13)
    # bfloat16 in: statistics in float32, gradient back in bfloat16.
    xb = x.astype(jnp.bfloat16)
    mb, vb = batch_moments(xb, (0, 1, 2))
    assert mb.dtype == vb.dtype == jnp.float32
    assert jax.grad(lambda x: jnp.sum(batch_moments(x, (0, 1, 2))[1]))(xb).dtype == jnp.bfloat16


def test_batch_norm_running_statistics_unchanged_by_the_fused_path():
    """Running mean and unbiased running variance, exactly PyTorch's update."""
    gen = np.random.default_rng(2)
    x = jnp.asarray(gen.standard_normal((2, 3, 3, 4)))
    module = BatchNorm(momentum=0.9, activation=relu6, dtype=jnp.float64)
    variables = module.init(jax.random.PRNGKey(0), x, use_running_average=False)
    _, updates = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    flat = np.asarray(x).reshape(-1, 4)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-6)


def test_conv_bn_act_is_batch_norm_then_activation():
    gen = np.random.default_rng(3)
    x = jnp.asarray(gen.standard_normal((2, 6, 6, 8)))
    fused = ConvBNAct(16, kernel_size=1, kind="pointwise", activation="relu6", dtype=jnp.float64)
    linear = ConvBNAct(16, kernel_size=1, kind="pointwise", activation=None, dtype=jnp.float64)
    variables = fused.init(jax.random.PRNGKey(0), x)
    for train in (False, True):
        got = fused.apply(variables, x, train=train, mutable=["batch_stats"])[0]
        want = relu6(linear.apply(variables, x, train=train, mutable=["batch_stats"])[0])
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(2, 5, 5, 6), (3, 7, 6), (4, 6)])
def test_pointwise_matmul_gradients_equal_plain_autodiff(shape):
    gen = np.random.default_rng(4)
    x = jnp.asarray(gen.standard_normal(shape))
    w = jnp.asarray(gen.standard_normal((shape[-1], 9)))
    cotangent = jnp.asarray(gen.standard_normal(shape[:-1] + (9,)))
    plain = lambda x, w: jnp.sum(jnp.einsum("...c,cd->...d", x, w) * cotangent)
    ours = lambda x, w: jnp.sum(pointwise_matmul(x, w) * cotangent)
    np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-13)
    for g, want in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
        np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-12)
    # Mixed dtypes come back in the inputs' dtypes.
    gx, gw = jax.grad(lambda x, w: jnp.sum(pointwise_matmul(x, w)), (0, 1))(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert gx.dtype == gw.dtype == jnp.bfloat16
