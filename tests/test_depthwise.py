"""Every depthwise implementation equals XLA's grouped convolution, forward and backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ca_flax.layers import DEPTHWISE_IMPLEMENTATIONS, DepthwiseConv, depthwise_conv, resolve_impl

FAST_IMPLS = [impl for impl in DEPTHWISE_IMPLEMENTATIONS if impl != "xla"]


def reference(x, kernel, stride):
    """Independent reference: lax's grouped convolution with PyTorch's symmetric padding."""
    p = kernel.shape[0] // 2
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), ((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
    )


def _inputs(shape, k, dtype=jnp.float32):
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(sum(shape) + k), 3)
    x = jax.random.normal(kx, shape, dtype)
    kernel = jax.random.normal(kk, (k, k, 1, shape[-1]), dtype)
    return x, kernel, kg


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 8, 8, 4), (2, 7, 9, 5), (1, 1, 1, 3), (1, 2, 3, 6)])
def test_forward_and_gradients_match_lax(impl, stride, shape):
    x, kernel, kg = _inputs(shape, 3)
    out = depthwise_conv(x, kernel, stride, impl)
    ref = reference(x, kernel, stride)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

    # A random cotangent, so every output position weighs differently.
    cot = jax.random.normal(kg, ref.shape)
    grads = jax.grad(lambda x, k: jnp.sum(depthwise_conv(x, k, stride, impl) * cot), (0, 1))(x, kernel)
    ref_grads = jax.grad(lambda x, k: jnp.sum(reference(x, k, stride) * cot), (0, 1))(x, kernel)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_float64_exact_for_other_kernel_sizes_and_strides(impl, stride):
    with jax.enable_x64(True):
        x, kernel, kg = _inputs((2, 10, 11, 3), 5, jnp.float64)
        cot = jax.random.normal(kg, reference(x, kernel, stride).shape, jnp.float64)
        loss = lambda f: (lambda x, k: jnp.sum(f(x, k) * cot))  # noqa: E731
        grads = jax.grad(loss(lambda x, k: depthwise_conv(x, k, stride, impl)), (0, 1))(x, kernel)
        ref_grads = jax.grad(loss(lambda x, k: reference(x, k, stride)), (0, 1))(x, kernel)
        np.testing.assert_allclose(depthwise_conv(x, kernel, stride, impl), reference(x, kernel, stride), atol=1e-12)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, atol=1e-12)


@pytest.mark.parametrize("impl", DEPTHWISE_IMPLEMENTATIONS)
def test_jit_and_second_order(impl):
    x, kernel, _ = _inputs((1, 6, 6, 2), 3)
    f = jax.jit(lambda x, k: jnp.sum(depthwise_conv(x, k, 2, impl) ** 2))
    g = jax.grad(f, 1)(x, kernel)
    assert g.shape == kernel.shape and bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_bfloat16_runs_and_stays_close(impl):
    x, kernel, _ = _inputs((2, 8, 8, 4), 3)
    out = depthwise_conv(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), 2, impl)
    assert out.dtype == jnp.bfloat16
    grad = jax.grad(lambda k: jnp.sum(depthwise_conv(x.astype(jnp.bfloat16), k, 2, impl).astype(jnp.float32)))(
        kernel.astype(jnp.bfloat16)
    )
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), reference(x, kernel, 2), rtol=0.05, atol=0.1)


def test_module_parameter_layout_is_independent_of_impl(rng):
    x = jnp.ones((1, 8, 8, 6))
    shapes = {
        impl: jax.tree_util.tree_map(lambda a: a.shape, DepthwiseConv(stride=2, impl=impl).init(rng, x))
        for impl in DEPTHWISE_IMPLEMENTATIONS + ("auto",)
    }
    assert all(s == {"params": {"kernel": (3, 3, 1, 6)}} for s in shapes.values())
    variables = DepthwiseConv(stride=2, impl="xla").init(rng, x)
    outs = [DepthwiseConv(stride=2, impl=impl).apply(variables, x) for impl in DEPTHWISE_IMPLEMENTATIONS]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], rtol=1e-6)


def test_module_dtypes(rng):
    x = jnp.ones((1, 8, 8, 4), jnp.float32)
    module = DepthwiseConv(dtype=jnp.bfloat16, param_dtype=jnp.float32)
    variables = module.init(rng, x)
    assert variables["params"]["kernel"].dtype == jnp.float32
    assert module.apply(variables, x).dtype == jnp.bfloat16


def test_auto_resolves_per_backend():
    assert resolve_impl("auto", "cpu") == "shift_vjp"
    assert resolve_impl("auto", "gpu") == "xla"
    assert resolve_impl("auto", "tpu") == "xla"
    assert resolve_impl("auto") in DEPTHWISE_IMPLEMENTATIONS
    assert resolve_impl("shift") == "shift"


def test_bad_input_errors():
    x, kernel, _ = _inputs((1, 4, 4, 3), 3)
    with pytest.raises(ValueError, match="Unknown depthwise implementation 'fast'"):
        depthwise_conv(x, kernel, 1, "fast")
    with pytest.raises(ValueError, match="rank 4"):
        depthwise_conv(x[0], kernel, 1)
    with pytest.raises(ValueError, match=r"\(kH, kW, 1, C\)"):
        depthwise_conv(x, kernel[..., :2], 1)
    with pytest.raises(ValueError, match="odd"):
        depthwise_conv(x, jnp.ones((2, 2, 1, 3)), 1)
    with pytest.raises(ValueError, match="Stride"):
        depthwise_conv(x, kernel, 0)
