"""MobileNetV2 family: exact sizes, structure, feature maps, options and errors.

Most tests use tiny variants (width 0.25, 32x32 inputs); the few full-size ones are
marked ``slow`` and are deliberate: they pin the paper's numbers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numpy_variables, param_count

from ca_flax.layers import ConvBNAct
from ca_flax.models import InvertedResidual, MobileNetV2, create_model, list_models, make_divisible, model_defaults

TINY = dict(width_mult=0.25, num_classes=10)
X32 = jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32, 3))


def run(model, variables, x, **kwargs):
    """``model.apply`` compiled once: eager application compiles every op separately."""
    return jax.jit(functools.partial(model.apply, **kwargs))(variables, x)


def shapes_of(model, size=224):
    return jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    )


@pytest.mark.parametrize(
    "name, width, expected",
    [
        ("mobilenetv2", None, 3_504_872),
        ("mobilenetv2_se", None, 3_888_208),
        ("mobilenetv2_ca", None, 3_950_648),
        ("mobilenetv2_ca", 0.5, 2_095_568),
        ("mobilenetv2_cbam", None, 3_889_808),
        ("mobilenetv2_050", None, 1_968_680),
        ("mobilenetv2_100", None, 3_504_872),
        ("mobilenetv2_140", None, 6_108_776),
        ("mobilenetv2_110d", None, 4_516_520),
        ("mobilenetv2_120d", None, 5_831_144),
    ],
)
def test_parameter_counts_are_the_papers_and_timms(name, width, expected):
    assert param_count(shapes_of(create_model(name, width_mult=width))["params"]) == expected


def test_cbam_within_point2_percent_of_paper():
    count = param_count(shapes_of(create_model("mobilenetv2_cbam"))["params"])
    assert abs(count - 3_889_808) / 3_889_808 < 0.002


@pytest.mark.parametrize("width, low, high", [(0.75, 2.60e6, 2.68e6), (0.35, 1.64e6, 1.72e6)])
def test_other_widths_match_the_analytic_sizes(width, low, high):
    base = param_count(shapes_of(create_model("mobilenetv2", width_mult=width))["params"])
    assert low <= base <= high


@pytest.mark.parametrize(
    "value, divisor, expected", [(32 * 0.5, 8, 16), (16 * 0.35, 8, 8), (24 * 1.4, 8, 32), (1280 * 1.4, 8, 1792),
                                 (17.6, 8, 16), (32 * 0.1, 4, 4), (44.8, 8, 48), (100, 8, 104)],
)
def test_make_divisible(value, divisor, expected):
    assert make_divisible(value, divisor) == expected


def test_width_0_1_uses_divisor_4():
    model = create_model("mobilenetv2", width_mult=0.1)
    assert model.divisor == 4 and model.stem_width == 4
    assert {out for _, out, _, _ in model.block_specs()} == {4, 8, 12, 16, 32}


def test_registry_names_and_contract(rng):
    assert {"mobilenetv2", "mobilenetv2_se", "mobilenetv2_cbam", "mobilenetv2_ca"} <= set(list_models())
    assert list_models("cbam") == ["mobilenetv2_cbam"]
    model = create_model("mobilenetv2_ca", **TINY)
    assert isinstance(model, MobileNetV2) and model.attention == "ca"
    variables = jax.jit(functools.partial(model.init, train=False))(rng, X32)
    assert set(variables) == {"params", "batch_stats"}
    logits = run(model, variables, X32, train=False)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    # Overrides reach the module; the variant's own width is kept when none is given.
    assert create_model("mobilenetv2_140").width_mult == 1.4
    assert create_model("mobilenetv2_140", width_mult=1.0).width_mult == 1.0
    assert create_model("mobilenetv2", dropout_rate=0.3).dropout_rate == 0.3
    assert model_defaults("mobilenetv2_110d")["stage_repeats"] == (1, 3, 4, 5, 4, 4, 1)


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match=r"Unknown model 'mobilenetv2_caa'\. Did you mean 'mobilenetv2_ca'.*mobilenetv2_se"):
        create_model("mobilenetv2_caa")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width_mult=0), "width_mult must be a positive finite number"),
        (dict(width_mult=-0.5), "width_mult must be a positive finite number"),
        (dict(width_mult=float("nan")), "width_mult"),
        (dict(stage_repeats=(1, 2, 3)), "stage_repeats must be 7 positive integers"),
        (dict(stage_repeats=(1, 2, 3, 4, 3, 3, 0)), "stage_repeats"),
        (dict(attention="eca"), "Unknown attention 'eca'"),
        (dict(num_classes=-1), "num_classes"),
        (dict(dropout_rate=1.5), "dropout_rate"),
        (dict(stem_channels=0), "stem_channels"),
    ],
)
def test_invalid_configs_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model("mobilenetv2", **kwargs)


def test_invalid_attention_options_raise(rng):
    model = create_model("mobilenetv2_ca", attention_kwargs={"reduction": 0}, **TINY)
    with pytest.raises(ValueError, match="reduction must be a positive integer"):
        model.init(rng, X32)


@pytest.mark.parametrize(
    "shape, message",
    [((32, 32, 3), "rank 4.*x\\[None\\]"), ((1, 32, 32), "rank 4"),
     ((1, 3, 32, 32), "3 channels on the last axis \\(NHWC\\), got 32 .*NCHW.*x\\.transpose\\(0, 2, 3, 1\\)"),
     ((1, 3, 32, 4), "got 4 .*NCHW.*transpose"),  # axis 1 is 3, the last is not: NCHW, however small
     ((1, 64, 64, 4), "3 channels on the last axis \\(NHWC\\), got 4 .*alpha.*x\\[\\.\\.\\., :3\\]"),
     ((1, 32, 32, 5), "got 5 .*in_channels=5")],
    ids=["no-batch", "rank-3", "nchw", "small-nchw", "rgba", "other"],
)
def test_bad_input_rank_or_layout(shape, message, rng):
    model = create_model("mobilenetv2", **TINY)
    with pytest.raises(ValueError, match=message) as info:
        model.init(rng, jnp.zeros(shape))
    assert ("transpose" in str(info.value)) == (shape[1] == 3 and len(shape) == 4)


def _tiny_variables(name="mobilenetv2_ca", **kw):
    model = create_model(name, **{**TINY, **kw})
    return model, numpy_variables(model, X32.shape)


@pytest.mark.parametrize("attention, cls_name", [("ca", "CoordinateAttention"), ("se", "SqueezeExcitation"), ("cbam", "CBAM")])
def test_attention_only_in_expanded_blocks(attention, cls_name, rng):
    model = create_model("mobilenetv2", attention=attention, **TINY)
    params = shapes_of(model, 32)["params"]
    blocks = [k for k in params if k.startswith("blocks_")]
    assert len(blocks) == 17
    assert "attention" not in params["blocks_0"] and "expand" not in params["blocks_0"]
    assert all("attention" in params[b] and "expand" in params[b] for b in blocks if b != "blocks_0")
    assert all("attention" not in params[b] for b in blocks) == (attention is None)


def test_no_attention_model_has_none(rng):
    params = shapes_of(create_model("mobilenetv2", **TINY), 32)["params"]
    assert not any("attention" in params[b] for b in params if b.startswith("blocks_"))


@pytest.mark.parametrize(
    "features, stride, in_channels, residual",
    [(16, 1, 16, True), (24, 1, 16, False), (16, 2, 16, False), (8, 1, 8, True)],
)
def test_residual_only_for_stride_1_and_equal_channels(features, stride, in_channels, residual, rng):
    block = InvertedResidual(features, stride, expansion=6, attention="ca")
    x = jax.random.normal(rng, (2, 8, 8, in_channels))
    variables = block.init(rng, x)
    # Zero the projection's BN so the residual branch contributes exactly nothing.
    variables = jax.tree_util.tree_map(lambda a: a, variables)
    variables["params"]["project"]["bn"] = jax.tree_util.tree_map(jnp.zeros_like, variables["params"]["project"]["bn"])
    out = block.apply(variables, x)
    if residual:
        np.testing.assert_array_equal(out, x)
    else:
        assert not np.any(out)


def test_feature_maps_strides_and_channels():
    model, variables = _tiny_variables()
    maps = run(model, variables, X32, method=model.features)
    assert set(maps) == {"stem", "head"} | {f"stage{i}" for i in range(7)}
    strides = {"stem": 2, "stage0": 2, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 16, "stage5": 32, "stage6": 32, "head": 32}
    channels = {"stem": 8, "stage0": 8, "stage1": 8, "stage2": 8, "stage3": 16, "stage4": 24, "stage5": 40, "stage6": 80, "head": 1280}
    for name, fmap in maps.items():
        assert fmap.shape == (2, 32 // strides[name], 32 // strides[name], channels[name]), name
    logits = run(model, variables, X32)
    pooled = maps["head"].mean(axis=(1, 2))
    p = variables["params"]["classifier"]
    np.testing.assert_allclose(logits, pooled @ p["kernel"] + p["bias"], rtol=1e-5, atol=1e-6)


def test_odd_input_sizes_follow_pytorch_arithmetic():
    model, variables = _tiny_variables()
    x = jnp.ones((1, 33, 35, 3))
    maps = run(model, variables, x, method=model.features)
    # PyTorch: out = floor((in + 2 - 3) / 2) + 1 at every stride-2 layer.
    assert maps["stem"].shape[1:3] == (17, 18)
    assert maps["head"].shape[1:3] == (2, 2)


def test_stride2_padding_is_symmetric_like_pytorch(rng):
    unit = ConvBNAct(4, kernel_size=3, stride=2, kind="full", activation=None)
    x = jax.random.normal(rng, (1, 8, 8, 3))
    variables = unit.init(rng, x)
    kernel = variables["params"]["conv"]["kernel"]
    dn = ("NHWC", "HWIO", "NHWC")
    symmetric = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
    same = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=dn)
    bn = lambda y: y / np.sqrt(1 + 1e-5)  # noqa: E731  (fresh BN: mean 0, var 1, identity affine)
    out = unit.apply(variables, x)
    np.testing.assert_allclose(out, bn(symmetric), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, bn(same), atol=1e-3)


def test_train_mode_updates_batch_stats_and_uses_dropout(rng):
    model, variables = _tiny_variables(dropout_rate=0.5)
    train = jax.jit(lambda v, key: model.apply(v, X32, train=True, mutable=["batch_stats"], rngs={"dropout": key}))
    out1, state = train(variables, jax.random.PRNGKey(1))
    out2, _ = train(variables, jax.random.PRNGKey(2))
    assert not np.allclose(out1, out2)
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], state["batch_stats"])
    assert all(jax.tree_util.tree_leaves(changed))
    # Evaluation is deterministic and needs no RNG.
    np.testing.assert_array_equal(run(model, variables, X32), run(model, variables, X32))


def test_gradients_flow_to_every_parameter(rng):
    model, variables = _tiny_variables()

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, X32, train=True, mutable=["batch_stats"],
                                rngs={"dropout": rng})
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    grads = jax.jit(jax.grad(loss))(variables["params"])
    norms = jax.tree_util.tree_map(lambda g: float(jnp.linalg.norm(g)), grads)
    assert all(np.isfinite(n) and n > 0 for n in jax.tree_util.tree_leaves(norms))


def test_depthwise_implementations_agree_in_the_network():
    model, variables = _tiny_variables()
    outs = [run(model.clone(depthwise_impl=impl), variables, X32) for impl in ("xla", "shift", "shift_vjp")]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_float32_state(rng):
    model = create_model("mobilenetv2_ca", dtype=jnp.bfloat16, **TINY)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(shapes_of(model, 32)))
    variables = numpy_variables(model, X32.shape)
    logits, state = run(model, variables, X32, train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    assert logits.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(state))
    ref = run(model.clone(dtype=None), variables, X32)
    np.testing.assert_allclose(np.asarray(run(model, variables, X32), np.float32), ref, rtol=0.1, atol=0.1)


def test_authors_initialization(rng):
    model = create_model("mobilenetv2_ca", width_mult=1.0, num_classes=1000)
    variables = jax.jit(functools.partial(model.init, train=False))(rng, jnp.zeros((1, 32, 32, 3)))
    p = variables["params"]
    head = p["head"]["conv"]["kernel"]  # fan-out 1280: std sqrt(2 / 1280)
    assert abs(float(head.std()) - np.sqrt(2 / 1280)) < 0.02 * np.sqrt(2 / 1280)
    dw = p["blocks_16"]["depthwise"]["conv"]["kernel"]  # (3, 3, 1, 960): std sqrt(2 / (9 * 960))
    assert abs(float(dw.std()) - np.sqrt(2 / (9 * 960))) < 0.05 * np.sqrt(2 / (9 * 960))
    assert abs(float(p["classifier"]["kernel"].std()) - 0.01) < 0.0005
    assert not np.any(p["classifier"]["bias"]) and not np.any(p["blocks_1"]["attention"]["reduce"]["bias"])
    assert np.all(p["stem"]["bn"]["scale"] == 1) and not np.any(p["stem"]["bn"]["bias"])


def test_headless_backbone(rng):
    model = create_model("mobilenetv2_ca", width_mult=0.25, num_classes=0)
    variables = numpy_variables(model, X32.shape)
    assert "classifier" not in variables["params"]
    assert run(model, variables, X32).shape == (2, 1280)


@pytest.mark.slow
def test_full_size_mobilenetv2_ca_forward_at_224(rng):
    """The deliberate full-size check: the released network at ImageNet resolution."""
    model = create_model("mobilenetv2_ca")
    x = jax.random.normal(rng, (2, 224, 224, 3))
    variables = numpy_variables(model, x.shape)
    logits = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    assert logits.shape == (2, 1000) and bool(jnp.all(jnp.isfinite(logits)))
    assert not np.allclose(logits[0], logits[1], rtol=1e-3)
    maps = jax.eval_shape(functools.partial(model.apply, method=model.features), variables, x)
    assert maps["stage6"].shape == (2, 7, 7, 320) and maps["head"].shape == (2, 7, 7, 1280)
