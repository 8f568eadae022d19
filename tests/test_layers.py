"""The hand-written backward passes of the fast paths equal plain autodiff.

BatchNorm (statistics with a custom gradient, normalization + activation recomputed in
the backward pass), the pointwise matmul and the dense convolution as a patch matmul
are checked in float64 against the same math written without any of it, in training
mode, so the memory and speed work changes no value or gradient beyond rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ca_flax.layers import BatchNorm, DepthwiseConv, PointwiseConv
from ca_flax.layers.activations import hard_swish, relu6
from ca_flax.layers import ConvBNAct
from ca_flax.layers.conv import Conv, conv2d, extract_patches, pointwise_matmul, resolve_full_conv_impl
from ca_flax.layers.norm import batch_norm_train



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


def test_batch_norm_gradients_on_a_channels_first_axis():
    """axis=1 (NCHW): the backward pass's ties to the cotangent broadcast per channel."""
    gen = np.random.default_rng(7)
    x = jnp.asarray(gen.standard_normal((3, 4, 5, 6)))
    cotangent = jnp.asarray(gen.standard_normal(x.shape))
    module = BatchNorm(axis=1, activation=relu6, dtype=jnp.float64, param_dtype=jnp.float64)
    variables = module.init(jax.random.PRNGKey(0), x, use_running_average=False)

    def ours(x):
        return jnp.sum(module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])[0] * cotangent)

    def reference(x):
        moved = jnp.moveaxis(x, 1, -1)
        y = reference_batch_norm(moved, jnp.ones(4), jnp.zeros(4), relu6)
        return jnp.sum(jnp.moveaxis(y, -1, 1) * cotangent)

    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(reference)(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("axis", [3, 1])
def test_batch_norm_train_gradients_through_every_output(axis):
    """Cotangents of the batch mean and variance (unused by a model, whose running
    statistics are not differentiated) reach the input too, on either channel axis."""
    gen = np.random.default_rng(8)
    x = jnp.asarray(gen.standard_normal((3, 5, 4, 6)) + 1.0)
    scale, bias = jnp.asarray(gen.uniform(0.5, 1.5, x.shape[axis])), jnp.asarray(gen.standard_normal(x.shape[axis]))
    cotangent = jnp.asarray(gen.standard_normal(x.shape))
    weights = jnp.asarray(gen.standard_normal((2, x.shape[axis])))

    def loss(fn, x, scale, bias):
        y, mean, var = fn(x, scale, bias)
        return jnp.sum(y * cotangent) + jnp.sum(weights[0] * mean) + jnp.sum(weights[1] * jnp.sin(var))

    def reference(x, scale, bias):
        moved = jnp.moveaxis(x, axis, -1)
        mean, var = jnp.mean(moved, axis=(0, 1, 2)), jnp.var(moved, axis=(0, 1, 2))
        return jnp.moveaxis(reference_batch_norm(moved, scale, bias, hard_swish), -1, axis), mean, var

    ours = lambda x, scale, bias: batch_norm_train(x, scale, bias, axis, 1e-5, jnp.float64, hard_swish)
    np.testing.assert_allclose(loss(ours, x, scale, bias), loss(reference, x, scale, bias), rtol=1e-13)
    got = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(x, scale, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
    # bfloat16 maps: the output and the input gradient stay bfloat16, the statistics float32.
    xb = x.astype(jnp.bfloat16)
    y, mean, var = batch_norm_train(xb, scale, bias, axis, 1e-5, jnp.bfloat16, relu6)
    assert (y.dtype, mean.dtype, var.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    gx = jax.grad(lambda x: jnp.sum(batch_norm_train(x, scale, bias, axis, 1e-5, jnp.bfloat16, relu6)[0]))(xb)
    assert gx.dtype == jnp.bfloat16


def test_batch_norm_float32_gradients_with_a_large_mean():
    """The backward pass takes sum(g * (x - mean)) as sum(g * x) - mean * sum(g) (on CPU
    one library reduction of two stored maps, where the centred map would be written out
    first). In float32 that cancels digits when |mean| >> std; at mean/std = 20 every
    gradient must still be float32-accurate against float64."""
    gen = np.random.default_rng(11)
    x = 20.0 + gen.standard_normal((16, 12, 12, 8))
    cotangent = gen.standard_normal(x.shape)
    scale, bias = gen.uniform(0.5, 1.5, 8), gen.standard_normal(8)

    def grads(dtype):
        def loss(x, scale, bias):
            y = batch_norm_train(x, scale, bias, 3, 1e-5, dtype, relu6)[0]
            return jnp.sum(y * jnp.asarray(cotangent, dtype))
        args = [jnp.asarray(a, dtype) for a in (x, scale, bias)]
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)

    for got, want in zip(grads(jnp.float32), grads(jnp.float64)):
        got, want = np.asarray(got, np.float64), np.asarray(want)
        assert np.abs(got - want).max() <= 5e-5 * np.abs(want).max()


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


@pytest.mark.parametrize(
    "shape, kernel_size, stride",
    [((2, 9, 9, 3), 3, 2), ((2, 8, 8, 3), 3, 2), ((1, 7, 6, 2), 7, 1), ((2, 6, 7, 4), 1, 1), ((1, 10, 10, 5), 5, 3)],
)
def test_patch_convolution_equals_xla_convolution(shape, kernel_size, stride):
    gen = np.random.default_rng(5)
    x = jnp.asarray(gen.standard_normal(shape))
    kernel = jnp.asarray(gen.standard_normal((kernel_size, kernel_size, shape[-1], 6)))

    def loss(impl):
        def f(x, kernel):
            y = conv2d(x, kernel, stride, impl)
            return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))
        return f

    want = conv2d(x, kernel, stride, "xla")
    got = conv2d(x, kernel, stride, "patches")
    assert got.shape == want.shape == (shape[0], (shape[1] - 1) // stride + 1, (shape[2] - 1) // stride + 1, 6)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(jax.grad(loss("patches"), (0, 1))(x, kernel), jax.grad(loss("xla"), (0, 1))(x, kernel)):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-11)


def test_patches_follow_the_hwio_kernel_order():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float64).reshape(2, 4, 4, 3)
    patches = extract_patches(x, 3, 1)
    assert patches.shape == (2, 4, 4, 27)
    # Window (kh, kw) = (1, 1) is the centre pixel: columns 12..14 of every patch.
    np.testing.assert_array_equal(patches[..., 12:15], x)
    # Window (0, 0) of the top-left output is the zero padding.
    np.testing.assert_array_equal(patches[0, 0, 0, :3], 0.0)


def test_conv_module_parameters_and_implementation_choice():
    x = jnp.ones((1, 8, 8, 3))
    variables = Conv(4, kernel_size=3, stride=2).init(jax.random.PRNGKey(0), x)
    assert variables["params"]["kernel"].shape == (3, 3, 3, 4)  # nn.Conv's layout
    outputs = [Conv(4, kernel_size=3, stride=2, impl=impl).apply(variables, x) for impl in ("xla", "patches", "auto")]
    for y in outputs[1:]:
        np.testing.assert_allclose(y, outputs[0], rtol=1e-12, atol=1e-12)
    stem, cbam_spatial = (3, 3, 3, 32), (7, 7, 2, 1)
    assert resolve_full_conv_impl("auto", stem, "cpu") == "patches"
    assert resolve_full_conv_impl("auto", cbam_spatial, "cpu") == "xla"
    assert resolve_full_conv_impl("auto", stem, "tpu") == resolve_full_conv_impl("auto", stem, "gpu") == "xla"
    assert resolve_full_conv_impl("xla", stem, "cpu") == "xla"
    with pytest.raises(ValueError, match="choose one of"):
        resolve_full_conv_impl("im2row", stem)
    with pytest.raises(ValueError, match="square"):
        conv2d(x, jnp.ones((3, 2, 3, 4)))
    with pytest.raises(ValueError, match="rank 4"):
        Conv(4).init(jax.random.PRNGKey(0), jnp.ones((8, 8, 3)))


def test_activation_gradients_match_pytorch_at_the_kinks():
    """ReLU6 passes the gradient only strictly inside (0, 6), as PyTorch's hardtanh
    backward does; hard_swish and hard_sigmoid inherit it at x = -3 and 3."""
    torch = pytest.importorskip("torch")
    from ca_flax.layers.activations import hard_sigmoid

    points = np.array([-4.0, -3.0, -1.0, 0.0, 2.5, 3.0, 6.0, 7.0])
    pairs = [
        (relu6, torch.nn.functional.relu6),
        (hard_sigmoid, lambda t: torch.nn.functional.relu6(t + 3.0) / 6.0),
        (hard_swish, lambda t: t * torch.nn.functional.relu6(t + 3.0) / 6.0),
    ]
    for ours, theirs in pairs:
        t = torch.tensor(points, requires_grad=True)
        theirs(t).sum().backward()
        np.testing.assert_array_equal(jax.vmap(jax.grad(ours))(jnp.asarray(points)), t.grad.numpy())
        np.testing.assert_array_equal(ours(jnp.asarray(points)), theirs(torch.tensor(points)).numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_keep_nan_and_infinities_as_pytorch(dtype):
    """NaN stays NaN through ReLU6 (PyTorch's clamps propagate it), so a NaN input cannot
    come out as finite numbers; infinities saturate. Against the released code's formulas
    and PyTorch's own hardswish and hardsigmoid (rounding aside: XLA divides by 6 as a
    multiplication by 1/6)."""
    torch = pytest.importorskip("torch")
    from ca_flax.layers.activations import hard_sigmoid

    special = [np.nan, np.inf, -np.inf, -1e30, -7.0, -3.0, -1.0, -0.0, 0.0, 0.5, 3.0, 6.0, 6.5, 1e30]
    points = np.concatenate([special, np.random.default_rng(9).uniform(-10, 10, 50)]).astype(dtype)
    t = torch.tensor(points)
    relu6_t = torch.nn.functional.relu6
    triples = [
        (relu6, relu6_t, relu6_t),
        (hard_sigmoid, lambda t: relu6_t(t + 3.0) / 6.0, torch.nn.functional.hardsigmoid),
        (hard_swish, lambda t: t * relu6_t(t + 3.0) / 6.0, torch.nn.functional.hardswish),
    ]
    for ours, formula, builtin in triples:
        for run in (ours, jax.jit(ours)):
            got = np.asarray(run(jnp.asarray(points)))
            assert got.dtype == dtype and np.isnan(got[0])
            for want in (formula(t).numpy(), builtin(t).numpy()):  # NaN and infinities where they are
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_after_keeps_values_and_recompute_in_backward_keeps_gradients():
    from ca_flax.layers.recompute import after, recompute_in_backward

    gen = np.random.default_rng(6)
    x = jnp.asarray(gen.standard_normal((2, 5, 5, 3)))
    for cotangent in (gen.standard_normal((2, 3, 3, 3)), gen.standard_normal((3,))):
        np.testing.assert_array_equal(after(x, jnp.asarray(cotangent)), x)
    assert after(x.astype(jnp.bfloat16), jnp.ones((3,))).dtype == jnp.bfloat16
    # A non-finite cotangent entry poisons the matching (example, channel) of x.
    poisoned = after(x, jnp.ones((2, 3, 3, 3)).at[1, 0, 0, 2].set(jnp.inf))
    assert bool(jnp.isnan(poisoned[1, ..., 2]).all()) and int(jnp.isnan(poisoned).sum()) == 25

    def fn(x, w, maybe, power):
        y = jnp.tanh(x * w) ** power
        return y * maybe if maybe is not None else y

    w = jnp.asarray(gen.standard_normal((3,)))
    for maybe in (None, jnp.asarray(gen.standard_normal((2, 5, 5, 3)))):
        ours = recompute_in_backward(fn, static_argnums=(3,))
        loss = lambda f: (lambda x, w, m: jnp.sum(jnp.sin(f(x, w, m, 3))))  # noqa: E731
        np.testing.assert_array_equal(ours(x, w, maybe, 3), fn(x, w, maybe, 3))
        got = jax.grad(loss(ours), (0, 1, 2))(x, w, maybe)
        want = jax.grad(loss(fn), (0, 1, 2))(x, w, maybe)
        for g, h in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(g, h, rtol=1e-13, atol=1e-13)


def test_parameters_keep_flax_shape_checks():
    """Layers check an existing parameter's shape directly (layers/params.py) and raise
    Flax's own error for a mismatch, as ``Module.param`` would."""
    from flax.errors import ScopeParamShapeError

    x = jnp.ones((1, 4, 4, 3))
    layers = [(PointwiseConv(5, use_bias=True), {}), (Conv(5, kernel_size=3), {}), (DepthwiseConv(3), {}),
              (BatchNorm(), {"use_running_average": True})]
    for module, kwargs in layers:
        variables = module.init(jax.random.PRNGKey(0), x, **kwargs)
        assert module.apply(variables, x, **kwargs).shape[:3] == x.shape[:3]
        wrong = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape[:-1] + (a.shape[-1] + 1,)), variables["params"])
        with pytest.raises(ScopeParamShapeError, match="kernel|scale|bias"):
            module.apply({**variables, "params": wrong}, x, **kwargs)
