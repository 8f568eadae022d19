"""Coordinate Attention, SE and CBAM: shapes, dtypes, options, and CA against the
released PyTorch block with the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import param_count

from ca_flax.attention import CBAM, CoordinateAttention, SqueezeExcitation, create_attention

X = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 5, 64))
BLOCKS = [CoordinateAttention, SqueezeExcitation, CBAM]


@pytest.mark.parametrize("cls", BLOCKS)
@pytest.mark.parametrize("shape", [(2, 6, 5, 64), (1, 1, 1, 16), (3, 7, 7, 24)])
def test_shape_preserved_train_and_eval(cls, shape, rng):
    x = jax.random.normal(rng, shape)
    block = cls()
    variables = block.init(rng, x)
    out = block.apply(variables, x, train=False)
    assert out.shape == x.shape and out.dtype == x.dtype
    out, updates = block.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("cls", BLOCKS)
def test_bfloat16_compute_float32_params(cls, rng):
    block = cls(dtype=jnp.bfloat16)
    variables = block.init(rng, X)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(variables))
    out, updates = block.apply(variables, X.astype(jnp.bfloat16), train=True, mutable=["batch_stats"])
    assert out.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(updates))
    ref = block.clone(dtype=None).apply(variables, X)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), block.clone(dtype=None).apply(
        variables, X, train=True, mutable=["batch_stats"])[0], rtol=0.05, atol=0.05)
    assert ref.shape == X.shape


@pytest.mark.parametrize("cls", BLOCKS)
def test_param_dtype(cls, rng):
    variables = cls(param_dtype=jnp.bfloat16).init(rng, X)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree_util.tree_leaves(variables["params"]))


def _ca_params(block, x, rng):
    return jax.eval_shape(block.init, rng, x)["params"]


@pytest.mark.parametrize(
    "channels, reduction, min_channels, mip",
    [(64, 32, 8, 8), (960, 32, 8, 30), (96, 32, 8, 8), (960, 16, 8, 60), (64, 32, 4, 4), (16, 1, 8, 16)],
)
def test_ca_reduced_width(channels, reduction, min_channels, mip, rng):
    x = jnp.ones((1, 4, 3, channels))
    params = _ca_params(CoordinateAttention(reduction=reduction, min_channels=min_channels), x, rng)
    shapes = jax.tree_util.tree_map(lambda a: a.shape, params)
    assert shapes["reduce"] == {"kernel": (1, 1, channels, mip), "bias": (mip,)}
    assert shapes["gate_h"] == shapes["gate_w"] == {"kernel": (1, 1, mip, channels), "bias": (channels,)}
    assert param_count(params) == channels * mip + mip + 2 * mip + 2 * (mip * channels + channels)


def test_ca_formula_matches_a_direct_numpy_computation(rng):
    block = CoordinateAttention()
    variables = block.init(rng, X)
    variables = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(rng, a.shape), variables)
    p, s = variables["params"], variables["batch_stats"]
    x = np.asarray(X, np.float64)
    h = x.shape[1]
    y = np.concatenate([x.mean(axis=2), x.mean(axis=1)], axis=1)  # N, H+W, C
    y = y @ np.asarray(p["reduce"]["kernel"][0, 0]) + np.asarray(p["reduce"]["bias"])
    y = (y - np.asarray(s["bn"]["mean"])) / np.sqrt(np.asarray(s["bn"]["var"]) + 1e-5)
    y = y * np.asarray(p["bn"]["scale"]) + np.asarray(p["bn"]["bias"])
    y = y * np.clip(y + 3, 0, 6) / 6
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    a_h = sig(y[:, :h] @ np.asarray(p["gate_h"]["kernel"][0, 0]) + np.asarray(p["gate_h"]["bias"]))
    a_w = sig(y[:, h:] @ np.asarray(p["gate_w"]["kernel"][0, 0]) + np.asarray(p["gate_w"]["bias"]))
    expected = x * a_w[:, None, :, :] * a_h[:, :, None, :]
    np.testing.assert_allclose(block.apply(variables, X), expected, rtol=1e-5, atol=1e-6)


def test_ca_batchnorm_statistics_are_joint_over_h_and_w(rng):
    block = CoordinateAttention()
    variables = block.init(rng, X)
    _, state = block.apply(
        variables, X, train=True, capture_intermediates=lambda mdl, _: mdl.name == "reduce",
        mutable=["batch_stats", "intermediates"],
    )
    pre_bn = state["intermediates"]["reduce"]["__call__"][0]  # (N, H + W, mip)
    assert pre_bn.shape == (2, 6 + 5, 8)
    mean = pre_bn.mean(axis=(0, 1))
    count = pre_bn.shape[0] * pre_bn.shape[1]
    unbiased_var = pre_bn.var(axis=(0, 1)) * count / (count - 1)
    np.testing.assert_allclose(state["batch_stats"]["bn"]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state["batch_stats"]["bn"]["var"], 0.9 + 0.1 * unbiased_var, rtol=1e-5)
    # Statistics of the H strip alone differ from the joint ones.
    assert not np.allclose(pre_bn[:, :6].var(axis=(0, 1)), pre_bn.var(axis=(0, 1)), rtol=1e-3)


@pytest.mark.parametrize("direction, constant_axis", [("h", 2), ("w", 1)])
def test_ca_single_direction_ablation(direction, constant_axis, rng):
    block = CoordinateAttention(directions=direction)
    variables = block.init(rng, X)
    assert set(variables["params"]) == {"reduce", "bn", f"gate_{direction}"}
    gate = block.apply(variables, X) / X
    # An H-only gate is the same for every column, a W-only gate for every row.
    first = jnp.take(gate, jnp.array([0]), axis=constant_axis)
    np.testing.assert_allclose(gate, np.broadcast_to(first, gate.shape), rtol=1e-4)
    both = CoordinateAttention()
    assert param_count(variables["params"]) < param_count(both.init(rng, X)["params"])


def test_ca_activation_option_changes_output(rng):
    a, b = CoordinateAttention(), CoordinateAttention(activation="relu6")
    variables = a.init(rng, X)
    assert not np.allclose(a.apply(variables, X), b.apply(variables, X))


def test_se_matches_direct_computation(rng):
    block = SqueezeExcitation()
    variables = block.init(rng, X)
    p = variables["params"]
    assert p["reduce"]["kernel"].shape == (1, 1, 64, 64 // 24)
    s = np.asarray(X).mean(axis=(1, 2))
    s = np.clip(s @ np.asarray(p["reduce"]["kernel"][0, 0]) + np.asarray(p["reduce"]["bias"]), 0, 6)
    s = 1 / (1 + np.exp(-(s @ np.asarray(p["expand"]["kernel"][0, 0]) + np.asarray(p["expand"]["bias"]))))
    np.testing.assert_allclose(block.apply(variables, X), np.asarray(X) * s[:, None, None, :], rtol=1e-5, atol=1e-6)
    assert "batch_stats" not in variables


def test_cbam_structure_and_parameter_count(rng):
    block = CBAM()
    variables = block.init(rng, X)
    hidden = 64 // 24
    assert param_count(variables["params"]) == 2 * 64 * hidden + hidden + 64 + 7 * 7 * 2 + 2
    assert variables["params"]["spatial"]["conv"]["kernel"].shape == (7, 7, 2, 1)
    assert set(variables["batch_stats"]["spatial"]["bn"]) == {"mean", "var"}


def _cbam_reference(variables, x, order=("max", "mean")):
    """CBAM written out with numpy and one lax convolution (eval mode)."""
    p, stats = variables["params"], variables["batch_stats"]
    x = np.asarray(x)

    def mlp(v):
        h = np.maximum(v @ np.asarray(p["mlp_reduce"]["kernel"][0, 0]) + np.asarray(p["mlp_reduce"]["bias"]), 0)
        return h @ np.asarray(p["mlp_expand"]["kernel"][0, 0]) + np.asarray(p["mlp_expand"]["bias"])

    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    x = x * sig(mlp(x.mean(axis=(1, 2))) + mlp(x.max(axis=(1, 2))))[:, None, None, :]
    maps = {"max": x.max(axis=-1, keepdims=True), "mean": x.mean(axis=-1, keepdims=True)}
    pooled = np.concatenate([maps[k] for k in order], axis=-1)
    s = jax.lax.conv_general_dilated(
        pooled, p["spatial"]["conv"]["kernel"], (1, 1), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    bn, bn_stats = p["spatial"]["bn"], stats["spatial"]["bn"]
    s = (np.asarray(s) - bn_stats["mean"]) / np.sqrt(bn_stats["var"] + 1e-5) * bn["scale"] + bn["bias"]
    return x * sig(s)


def test_cbam_matches_direct_computation_with_max_then_mean(rng):
    block = CBAM()
    variables = block.init(rng, X)
    variables = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.normal(rng, a.shape), variables)
    variables["batch_stats"]["spatial"]["bn"]["var"] = jnp.abs(variables["batch_stats"]["spatial"]["bn"]["var"])
    out = block.apply(variables, X)
    np.testing.assert_allclose(out, _cbam_reference(variables, X), rtol=1e-4, atol=1e-5)
    assert not np.allclose(out, _cbam_reference(variables, X, order=("mean", "max")), rtol=1e-4, atol=1e-5)


def test_create_attention_and_errors():
    assert isinstance(create_attention("ca", reduction=16), CoordinateAttention)
    with pytest.raises(ValueError, match=r"Unknown attention 'eca'.*'ca'"):
        create_attention("eca")
    with pytest.raises(ValueError, match="rank 4"):
        CoordinateAttention().init(jax.random.PRNGKey(0), jnp.ones((2, 5, 8)))
    with pytest.raises(ValueError, match="reduction must be a positive integer"):
        CoordinateAttention(reduction=0).init(jax.random.PRNGKey(0), X)
    with pytest.raises(ValueError, match="directions"):
        CoordinateAttention(directions="x").init(jax.random.PRNGKey(0), X)
    with pytest.raises(ValueError, match="reduction"):
        SqueezeExcitation(reduction=-2).init(jax.random.PRNGKey(0), X)
    with pytest.raises(ValueError, match="Unknown activation"):
        CBAM(activation="nope").init(jax.random.PRNGKey(0), X)


# -- against the authors' PyTorch block -------------------------------------------------


def _ca_variables_from_torch(block) -> dict:
    """Maps a torch CoordAtt's weights onto the Flax block's variables."""

    def conv(m):
        return {"kernel": m.weight.detach().numpy().transpose(2, 3, 1, 0), "bias": m.bias.detach().numpy()}

    bn = block.bn1
    return {
        "params": {
            "reduce": conv(block.conv1), "gate_h": conv(block.conv2), "gate_w": conv(block.conv3),
            "bn": {"scale": bn.weight.detach().numpy(), "bias": bn.bias.detach().numpy()},
        },
        "batch_stats": {"bn": {"mean": bn.running_mean.numpy().copy(), "var": bn.running_var.numpy().copy()}},
    }


@pytest.mark.parametrize("hw", [(7, 7), (6, 9)])
def test_ca_equals_released_pytorch_block_eval_and_train(hw):
    torch = pytest.importorskip("torch")
    import torch_reference as tr

    torch.manual_seed(0)
    ref = tr.CoordAtt(96, 96).double()
    with torch.no_grad():
        for t in list(ref.parameters()) + [ref.bn1.running_mean]:
            t.copy_(torch.randn_like(t) * 0.5)
        ref.bn1.running_var.uniform_(0.5, 2.0)
    x = np.random.default_rng(0).standard_normal((2, *hw, 96))
    variables = _ca_variables_from_torch(ref)
    x_t = torch.from_numpy(x.transpose(0, 3, 1, 2))

    with jax.enable_x64(True):
        block = CoordinateAttention()
        vars64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
        ref.eval()
        expected = ref(x_t).detach().numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(block.apply(vars64, x), expected, rtol=1e-12, atol=1e-12)

        ref.train()
        expected = ref(x_t).detach().numpy().transpose(0, 2, 3, 1)
        out, state = block.apply(vars64, x, train=True, mutable=["batch_stats"])
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
        # PyTorch's running-statistics update, unbiased variance included.
        np.testing.assert_allclose(state["batch_stats"]["bn"]["mean"], ref.bn1.running_mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(state["batch_stats"]["bn"]["var"], ref.bn1.running_var.numpy(), rtol=1e-12)
