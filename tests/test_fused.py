"""Inference fusions (``layers/fused.py``, the native inference kernels): the same values
and gradients as the modules they replace, taken only where they apply."""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ca_flax import native
from ca_flax.layers import fused
from ca_flax.models import create_model

requires_kernels = pytest.mark.skipif(
    native.depthwise_inference_target() is None or native.dense_conv_inference_target() is None
    or native.expand_depthwise_inference_target() is None,
    reason="the native kernels cannot be built here (no C++ compiler, or CA_FLAX_NATIVE=0)",
)
TARGETS = ("CaFlaxDepthwiseInference", "CaFlaxExpandDepthwiseInference", "CaFlaxDenseConvInference")


def _affine(key, channels):
    k1, k2, k3 = jax.random.split(key, 3)
    return fused.EvalAffine(jax.random.normal(k1, (channels,)), jax.random.uniform(k2, (channels,), minval=0.5, maxval=2.0),
                            jax.random.normal(k3, (channels,)))


def _close(got, want, rtol=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max())))


@requires_kernels
@pytest.mark.parametrize(
    "shape, k, stride, in_affine, in_relu6, out_relu6",
    [((2, 9, 7, 20), 3, 1, True, True, True), ((3, 10, 11, 33), 3, 2, True, False, True),
     ((1, 7, 7, 16), 5, 1, False, False, False), ((2, 8, 8, 24), 3, 3, True, True, False),
     ((1, 1, 1, 5), 3, 1, True, True, True), ((4, 3, 2, 8), 3, 2, False, False, True)],
)
def test_depthwise_inference_equals_its_xla_math(shape, k, stride, in_affine, in_relu6, out_relu6):
    keys = jax.random.split(jax.random.PRNGKey(sum(shape) + k), 4)
    c = shape[-1]
    x = 3 * jax.random.normal(keys[0], shape)
    kernel = jax.random.normal(keys[1], (k, k, 1, c))
    a_in = _affine(keys[2], c) if in_affine else None
    a_out = _affine(keys[3], c)
    got = jax.jit(native.depthwise_inference, static_argnums=(2, 4, 6))(x, kernel, stride, a_in, in_relu6, a_out, out_relu6)
    want = fused.depthwise_unit_math(x, kernel, a_in, a_out, stride, in_relu6, out_relu6)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == jnp.float32
        _close(g, w)


# (N, H, W, Ci), C, kernel size, stride, ReLU6 after the expand and after the depthwise.
# Widths cover every register tile (C = 144: 64-channel blocks and a 16; 96: 64 + 32;
# 20: 16 + a scalar tail; 5: the scalar tail alone) and, on AVX-512's 6-pixel tiles, rows
# ending in every partial tile (W = 12, 7, 8, 9, 10, 11: 0 to 5 pixels left over); one
# image of 29 rows splits into several chunks, which recompute their shared rows.
EXPAND_CASES = [
    ((2, 9, 7, 8), 144, 3, 1, True, True), ((3, 10, 11, 17), 96, 3, 2, True, False),
    ((1, 7, 13, 24), 20, 5, 1, False, True), ((2, 8, 8, 3), 48, 3, 3, True, True),
    ((1, 1, 1, 16), 5, 3, 1, True, True), ((4, 3, 10, 8), 32, 3, 2, False, False),
    ((1, 29, 12, 16), 96, 3, 1, True, True), ((2, 6, 9, 40), 80, 3, 2, True, True),
]


@requires_kernels
@pytest.mark.parametrize("shape, c, k, stride, in_relu6, out_relu6", EXPAND_CASES)
def test_expand_depthwise_inference_equals_its_xla_math(shape, c, k, stride, in_relu6, out_relu6):
    keys = jax.random.split(jax.random.PRNGKey(sum(shape) + c + k), 5)
    x = 3 * jax.random.normal(keys[0], shape)
    expand = jax.random.normal(keys[1], (shape[-1], c)) / np.sqrt(shape[-1])
    kernel = jax.random.normal(keys[2], (k, k, 1, c))
    a_in, a_out = _affine(keys[3], c), _affine(keys[4], c)
    got = jax.jit(native.expand_depthwise_inference, static_argnums=(3, 5, 7))(x, expand, a_in, in_relu6, kernel,
                                                                                stride, a_out, out_relu6)
    want = fused.expand_depthwise_unit_math(x, expand, a_in, in_relu6, kernel, stride, a_out, out_relu6)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == jnp.float32
        _close(g, w, rtol=2e-5)


@requires_kernels
def test_expand_depthwise_inference_does_not_depend_on_the_batch_it_is_in():
    """An image alone (split into chunks of rows, which recompute the expand rows they
    share) and in a batch of nine (one chunk each): the same map and row sums to the bit;
    the column sums add the chunks' partial sums, so only their rounding may differ."""
    keys = jax.random.split(jax.random.PRNGKey(11), 5)
    x = jax.random.normal(keys[0], (9, 16, 10, 12))
    expand, kernel = jax.random.normal(keys[1], (12, 48)), jax.random.normal(keys[2], (3, 3, 1, 48))
    a_in, a_out = _affine(keys[3], 48), _affine(keys[4], 48)
    call = jax.jit(native.expand_depthwise_inference, static_argnums=(3, 5, 7))
    batch = call(x, expand, a_in, True, kernel, 1, a_out, True)
    alone = call(x[4:5], expand, a_in, True, kernel, 1, a_out, True)
    for b, a in zip(batch[:2], alone[:2]):
        np.testing.assert_array_equal(np.asarray(b[4:5]), np.asarray(a))
    _close(batch[2][4:5], alone[2])


@requires_kernels
@pytest.mark.parametrize(
    "shape, k, out, stride, relu6",
    [((2, 16, 16, 3), 3, 32, 2, True), ((1, 9, 7, 3), 3, 13, 1, False), ((2, 5, 6, 2), 5, 40, 2, True),
     ((1, 1, 1, 3), 3, 8, 2, True), ((1, 9, 21, 3), 3, 112, 1, False)],  # 112: 64 + 32 + 16 channels
)
def test_dense_conv_inference_equals_its_xla_math(shape, k, out, stride, relu6):
    keys = jax.random.split(jax.random.PRNGKey(sum(shape) + out), 3)
    x = jax.random.normal(keys[0], shape)
    kernel = jax.random.normal(keys[1], (k, k, shape[-1], out))
    affine = _affine(keys[2], out)
    got = jax.jit(native.dense_conv_inference, static_argnums=(2, 4))(x, kernel, stride, affine, relu6)
    want = fused.dense_unit_math(x, kernel, affine, stride, relu6)
    assert got.shape == want.shape
    _close(got, want)


def _poisoned(x):
    """``x`` with NaN, +inf and -inf at three pixels of the first image, in every channel."""
    return x.at[0, 1, 1].set(jnp.nan).at[0, 2, -2].set(jnp.inf).at[0, -1, 0].set(-jnp.inf)


def _same_non_finite(got, want):
    """NaN and infinities where the reference has them, the same values elsewhere."""
    got, want = np.asarray(got), np.asarray(want)
    finite = np.isfinite(want)
    assert np.isnan(want).any()
    np.testing.assert_array_equal(np.where(finite, 0, got), np.where(finite, 0, want))  # NaN equals NaN here
    _close(np.where(finite, got, 0), np.where(finite, want, 0))


@requires_kernels
@pytest.mark.parametrize("in_affine, in_relu6, out_relu6", [(True, True, True), (False, False, True),
                                                            (True, False, False)])
def test_depthwise_inference_propagates_nan_as_its_xla_math(in_affine, in_relu6, out_relu6):
    """20 channels: 16 in a vector, 4 in the scalar tail; both ReLU6 flavours must keep NaN
    (PyTorch's ReLU6 does), not clamp it to 0 or 6."""
    keys = jax.random.split(jax.random.PRNGKey(7), 4)
    x = _poisoned(jax.random.normal(keys[0], (2, 9, 9, 20)))
    kernel = jax.random.normal(keys[1], (3, 3, 1, 20))
    a_in = _affine(keys[2], 20) if in_affine else None
    a_out = _affine(keys[3], 20)
    got = jax.jit(native.depthwise_inference, static_argnums=(2, 4, 6))(x, kernel, 1, a_in, in_relu6, a_out, out_relu6)
    want = fused.depthwise_unit_math(x, kernel, a_in, a_out, 1, in_relu6, out_relu6)
    for g, w in zip(got, want):
        _same_non_finite(g, w)


@requires_kernels
@pytest.mark.parametrize("in_relu6, out_relu6", [(True, True), (False, False)])
def test_expand_depthwise_inference_propagates_nan_as_its_xla_math(in_relu6, out_relu6):
    keys = jax.random.split(jax.random.PRNGKey(9), 5)
    x = _poisoned(jax.random.normal(keys[0], (2, 9, 9, 8)))
    expand, kernel = jax.random.normal(keys[1], (8, 20)), jax.random.normal(keys[2], (3, 3, 1, 20))
    a_in, a_out = _affine(keys[3], 20), _affine(keys[4], 20)
    got = jax.jit(native.expand_depthwise_inference, static_argnums=(3, 5, 7))(x, expand, a_in, in_relu6, kernel, 1,
                                                                                a_out, out_relu6)
    want = fused.expand_depthwise_unit_math(x, expand, a_in, in_relu6, kernel, 1, a_out, out_relu6)
    for g, w in zip(got, want):
        _same_non_finite(g, w)


@requires_kernels
@pytest.mark.parametrize("relu6", [True, False])
def test_dense_conv_inference_propagates_nan_as_its_xla_math(relu6):
    keys = jax.random.split(jax.random.PRNGKey(8), 3)
    x = _poisoned(jax.random.normal(keys[0], (2, 9, 9, 3)))
    kernel = jax.random.normal(keys[1], (3, 3, 3, 20))
    affine = _affine(keys[2], 20)
    got = jax.jit(native.dense_conv_inference, static_argnums=(2, 4))(x, kernel, 1, affine, relu6)
    _same_non_finite(got, fused.dense_unit_math(x, kernel, affine, 1, relu6))


def test_bad_shapes_are_named_errors():
    if native.depthwise_inference_target() is None:
        pytest.skip("no native kernels here")
    a = fused.EvalAffine(*(jnp.zeros((4,)),) * 3)
    with pytest.raises(Exception, match="depthwise inference: shapes do not match"):
        jax.block_until_ready(native.depthwise_inference(jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 1, 3)), 1, None, False,
                                                         a, False))
    if native.expand_depthwise_inference_target() is not None:
        with pytest.raises(Exception, match="depthwise inference: shapes do not match"):  # expand (5, 4) for Ci = 3
            jax.block_until_ready(native.expand_depthwise_inference(jnp.ones((1, 5, 5, 3)), jnp.ones((5, 4)), a, True,
                                                                    jnp.ones((3, 3, 1, 4)), 1, a, True))


def _tiny(attention, **kwargs):
    return create_model("mobilenetv2", attention=attention, width_mult=0.25, stage_repeats=(1, 2, 1, 1, 1, 1, 1),
                        num_classes=10, **kwargs)


@functools.lru_cache(maxsize=None)
def _variables(attention):
    """Initialized variables with BatchNorm statistics and parameters away from their
    initial values, so every affine map matters."""
    variables = _tiny(attention).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))

    def perturb(path, leaf):
        key = jax.random.PRNGKey(zlib.crc32(jax.tree_util.keystr(path).encode()))
        leaf = leaf * (1 + 0.2 * jax.random.normal(key, leaf.shape)) + 0.05 * jax.random.normal(key, leaf.shape)
        return jnp.abs(leaf) if jax.tree_util.keystr(path).endswith("['var']") else leaf

    return jax.tree_util.tree_map_with_path(perturb, variables)


def _images(n=3):
    return jax.random.normal(jax.random.PRNGKey(2), (n, 32, 32, 3))


def _unfused(model, variables, x):
    """The modules as written: recording intermediates turns the fusions off."""
    return model.apply(variables, x, mutable=["intermediates"])[0]


@requires_kernels
@pytest.mark.parametrize("attention", ["ca", "se", "cbam", None])
def test_fused_eval_model_equals_the_modules(attention):
    model, variables, x = _tiny(attention), _variables(attention), _images()
    text = jax.jit(model.apply).lower(variables, x).as_text()
    assert all(target in text for target in TARGETS)
    _close(jax.jit(model.apply)(variables, x), jax.jit(functools.partial(_unfused, model))(variables, x), rtol=2e-5)


@requires_kernels
def test_fused_features_equal_the_modules():
    model, variables, x = _tiny("ca"), _variables("ca"), _images(2)
    got = jax.jit(functools.partial(model.apply, method=model.features))(variables, x)
    want = model.apply(variables, x, method=model.features, mutable=["intermediates"])[0]
    for name in want:
        _close(got[name], want[name], rtol=2e-5)


@requires_kernels
def test_gradients_of_an_eval_mode_loss_through_the_fused_units():
    """Frozen-BatchNorm fine-tuning and input gradients differentiate the eval model."""
    model, variables, x = _tiny("ca"), _variables("ca"), _images(2)

    def loss(params, x, apply):
        return jnp.sum(apply({**variables, "params": params}, x) ** 2)

    fused_apply = model.apply
    plain_apply = functools.partial(_unfused, model)
    for argnum in (0, 1):
        got = jax.jit(jax.grad(loss, argnum), static_argnums=2)(variables["params"], x, fused_apply)
        want = jax.jit(jax.grad(loss, argnum), static_argnums=2)(variables["params"], x, plain_apply)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            _close(g, w, rtol=1e-4)


@requires_kernels
@pytest.mark.parametrize(
    "case", ["train", "bfloat16", "explicit depthwise impl", "hard_swish", "intermediates", "init"]
)
def test_fusions_are_skipped_where_they_do_not_apply(case):
    model, variables, x = _tiny("ca"), _variables("ca"), _images(2)
    kwargs = {}
    if case == "bfloat16":
        model = _tiny("ca", dtype=jnp.bfloat16)
    elif case == "explicit depthwise impl":
        model = _tiny("ca", depthwise_impl="shift_vjp")
    elif case == "hard_swish":
        model = _tiny("ca", activation="hard_swish")
    elif case == "train":
        kwargs = dict(train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
    elif case == "intermediates":
        kwargs = dict(mutable=["intermediates"])
    if case == "init":
        text = jax.jit(model.init).lower(jax.random.PRNGKey(0), x).as_text()
    else:
        text = jax.jit(functools.partial(model.apply, **kwargs)).lower(variables, x).as_text()
    assert "DepthwiseInference" not in text  # neither depthwise kernel, with or without its expand
    # The stem has no depthwise option: it is still fused there.
    assert ("CaFlaxDenseConvInference" in text) == (case == "explicit depthwise impl")


@requires_kernels
def test_without_the_expand_kernel_the_expand_matmul_stays_xla(monkeypatch):
    monkeypatch.setattr(native, "expand_depthwise_inference_target", lambda: None)
    model, variables, x = _tiny("ca"), _variables("ca"), _images(2)
    program = jax.jit(lambda v, x: model.apply(v, x))
    text = program.lower(variables, x).as_text()
    assert "CaFlaxDepthwiseInference" in text and "CaFlaxExpandDepthwiseInference" not in text
    _close(program(variables, x), jax.jit(functools.partial(_unfused, model))(variables, x), rtol=2e-5)


@requires_kernels
def test_native_off_runs_the_modules(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    model, variables, x = _tiny("ca"), _variables("ca"), _images(2)
    text = jax.jit(model.apply).lower(variables, x).as_text()
    assert not any(target in text for target in TARGETS)


def test_remembered_sums_of_the_wrong_shape_are_a_named_error():
    from ca_flax.layers.pooling import DirectionalSums, remember_sums

    x = jnp.ones((1, 4, 6, 8))
    with pytest.raises(ValueError, match="row sums"):
        remember_sums(x, DirectionalSums(jnp.ones((1, 6, 8)), jnp.ones((1, 4, 8))))


def test_pools_use_remembered_sums_only_for_that_very_map():
    from ca_flax.layers.pooling import DirectionalSums, known_sums, pool_cols, pool_global, pool_rows, remember_sums

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 6, 3))
    # Deliberately not x's sums, to see which path each pool took.
    fake = DirectionalSums(jnp.full((2, 4, 3), 6.0), jnp.full((2, 6, 3), 4.0))
    remember_sums(x, fake)
    assert known_sums(x) is fake
    np.testing.assert_array_equal(pool_rows(x), 1.0)
    np.testing.assert_array_equal(pool_cols(x), 1.0)
    np.testing.assert_array_equal(pool_global(x), 1.0)
    other = x + 0  # equal values, another array: pooled from its values
    assert known_sums(other) is None
    np.testing.assert_allclose(pool_rows(other), jnp.mean(x, axis=2), rtol=1e-6)
    del x
    import gc

    gc.collect()
    assert known_sums(other) is None


def test_a_producer_must_be_pointwise_and_feed_a_depthwise_unit():
    from ca_flax.layers import ConvBNAct

    unit = ConvBNAct(8, kind="full")
    producer = ConvBNAct(8, kernel_size=1, kind="pointwise")
    x = jnp.ones((1, 4, 4, 8))

    class Pair(nn.Module):
        @nn.compact
        def __call__(self, x):
            return ConvBNAct(8, kind="full")(x, producer=ConvBNAct(8, kernel_size=1, kind="pointwise"))

    with pytest.raises(ValueError, match="producer is taken by a depthwise unit"):
        Pair().init(jax.random.PRNGKey(0), x)
    del unit, producer


def test_block_with_a_producer_equals_the_units_one_after_the_other():
    from ca_flax.layers import ConvBNAct

    class Chained(nn.Module):
        fused: bool

        @nn.compact
        def __call__(self, x, train=False):
            expand = ConvBNAct(16, kernel_size=1, kind="pointwise", name="expand")
            depthwise = ConvBNAct(16, kernel_size=3, kind="depthwise", name="depthwise")
            return depthwise(x, train, producer=expand) if self.fused else depthwise(expand(x, train), train)

    x = jax.random.normal(jax.random.PRNGKey(3), (2, 12, 12, 8))
    variables = Chained(True).init(jax.random.PRNGKey(0), x)
    same = jax.tree_util.tree_map(np.array_equal, variables, Chained(False).init(jax.random.PRNGKey(0), x))
    assert all(jax.tree_util.tree_leaves(same))  # same parameter paths, same initial values
    for train in (False, True):
        kwargs = dict(mutable=["batch_stats"]) if train else {}
        ours = Chained(True).apply(variables, x, train, **kwargs)
        plain = Chained(False).apply(variables, x, train, **kwargs)
        np.testing.assert_allclose(np.asarray(jax.tree_util.tree_leaves(ours)[0]),
                                   np.asarray(jax.tree_util.tree_leaves(plain)[0]), rtol=1e-5, atol=1e-5)
