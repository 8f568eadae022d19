"""The C++ CPU kernels (``ca_flax.native``): same values as their XLA formulations, built
once and cached, and a clean fallback when they cannot be built or are turned off."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ca_flax import native
from ca_flax.layers import depthwise
from ca_flax.layers.activations import hard_swish, relu6
from ca_flax.layers.depthwise import depthwise_conv
from ca_flax.layers.norm import batch_norm_train

REPO = Path(__file__).resolve().parents[1]

requires_kernel = pytest.mark.skipif(
    native.depthwise_kernel_grad_target() is None,
    reason="the native kernel cannot be built here (no C++ compiler, or CA_FLAX_NATIVE=0)",
)


def _xla_kernel_grad(x, dy, kernel_hw, stride):
    """The XLA loop the native kernel replaces, in float64 as the reference."""
    with jax.enable_x64(True):
        x64, dy64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (x, dy))
        return np.asarray(depthwise._kernel_grad(x64, dy64, (*kernel_hw, 1, x.shape[-1]), stride))


@requires_kernel
@pytest.mark.parametrize(
    "shape, k, stride",
    [((2, 8, 8, 4), 3, 1), ((2, 7, 9, 5), 3, 2), ((1, 1, 1, 3), 3, 1), ((1, 2, 3, 6), 3, 2),
     ((3, 10, 11, 3), 5, 1), ((2, 10, 11, 7), 5, 3), ((20, 5, 4, 17), 3, 2)],
)
def test_depthwise_kernel_grad_equals_the_xla_loop(shape, k, stride):
    kx, kg = jax.random.split(jax.random.PRNGKey(sum(shape) + k + stride))
    x = jax.random.normal(kx, shape)
    out_hw = ((shape[1] - 1) // stride + 1, (shape[2] - 1) // stride + 1)
    dy = jax.random.normal(kg, (shape[0], *out_hw, shape[3]))
    got = jax.jit(native.depthwise_kernel_grad, static_argnums=(2, 3))(x, dy, (k, k), stride)
    want = _xla_kernel_grad(x, dy, (k, k), stride)
    assert got.shape == (k, k, 1, shape[3]) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@requires_kernel
def test_the_float32_cpu_backward_pass_uses_it_and_other_dtypes_do_not():
    x = jnp.ones((2, 6, 6, 4))
    kernel = jnp.ones((3, 3, 1, 4))
    grad = lambda x, k: jax.grad(lambda k: jnp.sum(depthwise_conv(x, k, 2, "shift_vjp")))(k)  # noqa: E731
    assert "ca_flax_CaFlaxDepthwiseKernelGrad" in jax.jit(grad).lower(x, kernel).as_text()
    bf16 = jax.jit(grad).lower(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)).as_text()
    assert "ca_flax_CaFlaxDepthwiseKernelGrad" not in bf16


@requires_kernel
@pytest.mark.parametrize("stride", [1, 2])
def test_second_order_derivatives_through_the_native_kernel(stride):
    """A gradient penalty on the kernel gradient differentiates the native kernel itself."""
    kx, kk, kc = jax.random.split(jax.random.PRNGKey(stride), 3)
    x, kernel = jax.random.normal(kx, (2, 7, 9, 5)), jax.random.normal(kk, (3, 3, 1, 5))
    cot = jax.random.normal(kc, depthwise_conv(x, kernel, stride, "xla").shape)

    def penalty_grad(impl):
        def penalty(x, cot):
            gk = jax.grad(lambda k: jnp.sum(depthwise_conv(x, k, stride, impl) * cot))(kernel)
            return jnp.sum(gk ** 2)
        return jax.grad(penalty, (0, 1))(x, cot)

    for got, want in zip(penalty_grad("shift_vjp"), penalty_grad("xla")):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


@requires_kernel
def test_batch_sharded_over_devices_gives_the_same_gradient(tmp_path):
    """Under jit with the batch split over 4 CPU devices: the depthwise kernel gradient
    (XLA gathers the custom call's operands: correct, not yet partitioned), and BatchNorm
    (XLA's partitioned formulation)."""
    script = textwrap.dedent("""
        import jax
        jax.config.update("jax_num_cpu_devices", 4)
        import jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from ca_flax.layers import depthwise_conv
        mesh = Mesh(np.array(jax.devices()), ("data",))
        x = jax.random.normal(jax.random.PRNGKey(0), (8, 10, 10, 6))
        k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, 6))
        cot = jax.random.normal(jax.random.PRNGKey(2), (8, 5, 5, 6))
        grad = lambda impl: jax.jit(jax.grad(lambda x, k: jnp.sum(depthwise_conv(x, k, 2, impl) * cot), (0, 1)))
        got = grad("shift_vjp")(jax.device_put(x, NamedSharding(mesh, P("data"))), k)
        for a, b in zip(got, grad("xla")(x, k)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
        # BatchNorm over several devices takes XLA's partitioned reductions, not the
        # native kernels (which would gather every map to each device)
        from ca_flax.layers.activations import relu6
        from ca_flax.layers.norm import batch_norm_train
        cot = jax.random.normal(jax.random.PRNGKey(3), x.shape)
        bn = lambda x, s: jnp.sum(batch_norm_train(x, s, 0.5 * s, 3, 1e-5, jnp.float32, relu6)[0] * cot)
        bn_grad = jax.jit(jax.grad(bn, (0, 1)))
        s = 1.0 + 0.1 * jnp.arange(6.0)
        sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
        assert "ca_flax_" not in bn_grad.lower(sharded, s).as_text()
        plain = lambda x, s: jnp.sum(jnp.clip((x - x.mean((0, 1, 2))) * s / jnp.sqrt(x.var((0, 1, 2)) + 1e-5)
                                              + 0.5 * s, 0, 6) * cot)
        for a, b in zip(bn_grad(sharded, s), jax.grad(plain, (0, 1))(x, s)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def _run_isolated(env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """A depthwise gradient in a fresh process with its own kernel cache and ``env``."""
    script = textwrap.dedent("""
        import warnings
        import jax, jax.numpy as jnp, numpy as np
        from ca_flax import native
        from ca_flax.layers import depthwise_conv
        x, k = jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, 1, 4))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g = jax.grad(lambda k: jnp.sum(depthwise_conv(x, k, 1, "shift_vjp")))(k)
        np.testing.assert_allclose(g[1, 1, 0], 72.0)  # the centre tap sees all 2 x 36 pixels
        print("target:", native.depthwise_kernel_grad_target())
        for w in caught:
            print("warning:", w.message)
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CA_FLAX_CACHE_DIR": str(tmp_path / "cache"), **env})


def test_without_a_compiler_it_warns_once_and_uses_xla(tmp_path):
    result = _run_isolated({"CXX": "no-such-compiler-ca-flax"}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "target: None" in result.stdout
    assert result.stdout.count("warning:") == 1 and "No C++ compiler 'no-such-compiler-ca-flax'" in result.stdout
    assert "CA_FLAX_NATIVE=0" in result.stdout


def test_a_failed_build_leaves_no_file_that_looks_built(tmp_path):
    result = _run_isolated({"CXX": "false"}, tmp_path)  # a "compiler" that always fails
    assert result.returncode == 0, result.stderr[-3000:]
    assert "target: None" in result.stdout and "failed" in result.stdout
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_unwritable_cache_warns_and_uses_xla(tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    result = _run_isolated({"CA_FLAX_CACHE_DIR": str(blocker / "cache")}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "target: None" in result.stdout and result.stdout.count("warning:") == 1


def test_turned_off_it_neither_builds_nor_warns(tmp_path):
    result = _run_isolated({native.DISABLE_ENV: "0"}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "target: None" in result.stdout and "warning:" not in result.stdout
    assert not (tmp_path / "cache").exists()


@requires_kernel
def test_built_once_then_reused_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CA_FLAX_CACHE_DIR", str(tmp_path))
    first = native.build("depthwise_kernel_grad")
    mtime = first.stat().st_mtime_ns
    assert native.build("depthwise_kernel_grad") == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_without_a_compiler_the_eval_model_warns_once_and_runs_the_modules(tmp_path):
    """Four kernels want building (two inference units, the kernel gradient, BatchNorm in
    training): one warning."""
    script = textwrap.dedent("""
        import warnings
        import jax, jax.numpy as jnp, numpy as np
        from ca_flax.models import create_model
        model = create_model("mobilenetv2_ca", width_mult=0.25, stage_repeats=(1,) * 7, num_classes=4)
        x = jnp.ones((2, 32, 32, 3))
        variables = model.init(jax.random.PRNGKey(0), x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text = jax.jit(model.apply).lower(variables, x).as_text()
            jax.grad(lambda p: jnp.sum(model.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"],
                                                    rngs={"dropout": jax.random.PRNGKey(0)})[0]))(variables["params"])
        print("custom calls:", text.count("ca_flax_"))
        for w in caught:
            print("warning:", w.message)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CA_FLAX_CACHE_DIR": str(tmp_path / "cache"), "CXX": "no-such-cxx"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "custom calls: 0" in result.stdout
    assert result.stdout.count("warning:") == 1, result.stdout


@requires_kernel
def test_disabled_block_traces_the_xla_formulation():
    x, kernel = jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, 1, 4))

    def program():  # a new function each time: jax reuses the trace of one it has seen
        return jax.jit(jax.grad(lambda k: jnp.sum(depthwise_conv(x, k, 1, "shift_vjp")))).lower(kernel).as_text()

    with native.disabled():
        assert not native.enabled()
        assert "ca_flax_" not in program()
    assert native.enabled() and "ca_flax_" in program()


def test_the_build_key_covers_the_headers(tmp_path, monkeypatch):
    from ca_flax.native import loader

    monkeypatch.setattr(loader, "SOURCE_DIR", tmp_path)
    (tmp_path / "k.cc").write_text('#include "h.h"\n')
    (tmp_path / "h.h").write_text("// one\n")
    first = loader._build_key(tmp_path / "k.cc", sys.executable)
    (tmp_path / "h.h").write_text("// two\n")
    assert loader._build_key(tmp_path / "k.cc", sys.executable) != first


# -- BatchNorm in training (batch statistics, ReLU6 or none) ------------------------------

requires_batch_norm_kernel = pytest.mark.skipif(
    native.batch_norm_train_target("statistics") is None,
    reason="the native kernels cannot be built here (no C++ compiler, or CA_FLAX_NATIVE=0)",
)


def _float64_batch_norm(x, scale, bias, activation, cotangent):
    """BatchNorm with batch statistics in float64 by plain autodiff: ``(y, mean, var)`` and
    the gradients of ``sum(y * cotangent)`` for x, scale and bias."""
    with jax.enable_x64(True):
        x, scale, bias, cotangent = (jnp.asarray(np.asarray(a), jnp.float64) for a in (x, scale, bias, cotangent))
        axes = tuple(range(x.ndim - 1))

        def forward(x, scale, bias):
            mean = jnp.mean(x, axes)
            var = jnp.mean(jnp.square(x - mean), axes)
            y = (x - mean) * (scale / jnp.sqrt(var + 1e-5)) + bias
            return (y if activation is None else activation(y)), mean, var

        grads = jax.grad(lambda *a: jnp.sum(forward(*a)[0] * cotangent), (0, 1, 2))(x, scale, bias)
        return [np.asarray(a) for a in (*forward(x, scale, bias), *grads)]


def _batch_norm_and_grads(x, scale, bias, activation, cotangent):
    """batch_norm_train in float32 under jit: ``(y, mean, var, dx, d_scale, d_bias)``."""
    def run(x, scale, bias):
        train = lambda *a: batch_norm_train(*a, x.ndim - 1, 1e-5, jnp.float32, activation)  # noqa: E731
        out = train(x, scale, bias)
        return (*out, *jax.grad(lambda *a: jnp.sum(train(*a)[0] * cotangent), (0, 1, 2))(x, scale, bias))
    return [np.asarray(a) for a in jax.jit(run)(x, scale, bias)]


def _batch_norm_operands(shape, seed):
    gen = np.random.default_rng(seed)
    c = shape[-1]
    # a per-channel offset and spread, so the statistics differ by channel and ReLU6 cuts
    # on both sides
    x = (gen.normal(0, 2, c) + gen.uniform(0.5, 3, c) * gen.standard_normal(shape)).astype(np.float32)
    scale, bias = gen.uniform(1, 4, c).astype(np.float32), gen.normal(3, 1.5, c).astype(np.float32)
    return x, scale, bias, gen.standard_normal(shape).astype(np.float32)


@requires_batch_norm_kernel
@pytest.mark.parametrize("relu6_on", [True, False])
@pytest.mark.parametrize(
    "shape",  # channels a multiple of 16 or not, a tail after whole periods, all tail, rank 2 and 3
    [(4, 5, 6, 7), (2, 8, 8, 32), (3, 9, 7, 24), (2, 3, 5, 144), (1, 1, 1, 3), (37, 5), (2, 33, 48)],
)
def test_batch_norm_train_kernels_equal_float64(shape, relu6_on):
    activation = relu6 if relu6_on else None
    x, scale, bias, cotangent = _batch_norm_operands(shape, sum(shape))
    got = _batch_norm_and_grads(x, scale, bias, activation, cotangent)
    want = _float64_batch_norm(x, scale, bias, activation, cotangent)
    if relu6_on and x.size > 100:  # both of ReLU6's kinks are exercised
        pre = _float64_batch_norm(x, scale, bias, None, cotangent)[0]
        assert np.mean(pre <= 0) > 0.05 and np.mean(pre >= 6) > 0.05
    for name, g, w in zip(["y", "mean", "var", "dx", "d_scale", "d_bias"], got, want):
        assert g.shape == w.shape and g.dtype == np.float32, name
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * np.abs(w).max(), err_msg=name)


@requires_batch_norm_kernel
def test_batch_norm_kernels_agree_with_the_xla_formulation_and_propagate_nan():
    x, scale, bias, cotangent = _batch_norm_operands((4, 6, 6, 20), 3)
    got = _batch_norm_and_grads(x, scale, bias, relu6, cotangent)
    with native.disabled():
        want = _batch_norm_and_grads(x, scale, bias, relu6, cotangent)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    x[0, 0, 0, 5] = np.nan  # NaN reaches its channel's statistics and outputs, as in XLA's
    y, mean, var = jax.jit(lambda x: batch_norm_train(x, scale, bias, 3, 1e-5, jnp.float32, relu6))(x)
    assert np.isnan(mean[5]) and np.isnan(var[5]) and np.isnan(y[..., 5]).all()
    assert np.isfinite(np.delete(np.asarray(y), 5, axis=-1)).all()


@requires_batch_norm_kernel
def test_batch_norm_uses_the_kernels_only_where_they_apply():
    """float32 on one CPU device, channels last, ReLU6 or no activation: both passes
    native; any other activation, dtype or channel axis, or inside native.disabled():
    XLA's (several devices: test_batch_sharded_over_devices_gives_the_same_gradient)."""
    x, scale = jnp.ones((2, 4, 4, 8)), jnp.ones(8)

    def program(axis=3, dtype=jnp.float32, activation=relu6, x=x):
        def loss(x, scale):
            return jnp.sum(batch_norm_train(x, scale, scale, axis, 1e-5, dtype, activation)[0])
        return jax.jit(jax.grad(loss, (0, 1))).lower(x, scale).as_text()

    for activation in (relu6, None):
        text = program(activation=activation)
        assert "CaFlaxBatchNormTrainStatistics" in text and "CaFlaxBatchNormTrainBackward" in text
    assert "ca_flax_" not in program(activation=hard_swish)
    assert "ca_flax_" not in program(axis=1, x=jnp.ones((2, 8, 4, 4)))
    assert "ca_flax_" not in program(dtype=jnp.bfloat16)
    assert "ca_flax_" not in program(x=x.astype(jnp.bfloat16))
    with native.disabled():
        assert "ca_flax_" not in program()


@requires_batch_norm_kernel
def test_second_order_derivatives_through_the_batch_norm_kernels():
    """A gradient penalty differentiates the backward kernel too (through XLA's math of
    the same values): equal to the XLA formulation's."""
    x, scale, bias, cotangent = _batch_norm_operands((3, 5, 5, 6), 5)

    def penalty_grad():
        def penalty(x, scale):
            loss = lambda x, scale: jnp.sum(batch_norm_train(x, scale, bias, 3, 1e-5, jnp.float32, relu6)[0]  # noqa: E731
                                            * cotangent)
            gx, gs = jax.grad(loss, (0, 1))(x, scale)
            return jnp.sum(gx ** 2) + jnp.sum(gs ** 2)
        return jax.jit(jax.grad(penalty, (0, 1)))(x, scale)

    got = penalty_grad()
    with native.disabled():
        want = penalty_grad()
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))
