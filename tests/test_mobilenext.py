"""MobileNeXt: the sizes and block list of docs/mobilenext.md, the partial shortcut, the
attention placements, MAdds and option errors.

Sizes come from ``jax.eval_shape`` (nothing compiled); the runs use tiny models on 32x32
images. ``tests/test_registry.py`` runs the registered variants through the common
contract; ``tests/test_mobilenext_exactness.py`` compares with the authors' PyTorch model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ca_flax.models import MobileNeXt, SandglassBlock, create_model
from ca_flax.models.mobilenext import identity_div, sandglass_plan
from ca_flax.models.summary import summarize

@functools.lru_cache(maxsize=None)
def _params(name: str = "mobilenext", **kwargs) -> dict:
    """Parameter shapes of a registered model (eval_shape: traced, not compiled)."""
    model = create_model(name, **kwargs)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x)["params"]


def _count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


# -- sizes and structure ---------------------------------------------------------------


@pytest.mark.parametrize(
    "width, params", [(0.35, 1_913_976), (0.5, 2_152_304), (0.75, 2_766_168), (1.0, 3_535_416), (1.4, 6_126_168)]
)
def test_parameter_counts_match_the_official_model(width, params):
    assert _count(_params(width_mult=width)) == params


# (case, in, hidden, out, stride, identity, keep_3x3) of the 20 blocks at width 1.0.
BLOCKS_W1 = (
    [("first", 32, 16, 96, 2, False, False), ("full", 96, 32, 144, 1, False, True),
     ("pointwise_down", 144, 32, 192, 2, False, False)]
    + [("full", 192, 32, 192, 1, True, False)] * 2
    + [("pointwise_down", 192, 48, 288, 2, False, False)]
    + [("full", 288, 48, 288, 1, True, False)] * 2
    + [("pointwise", 288, 64, 384, 1, False, False)]
    + [("full", 384, 64, 384, 1, True, False)] * 3
    + [("pointwise_down", 384, 96, 576, 2, False, False)]
    + [("full", 576, 96, 576, 1, True, False)] * 3
    + [("pointwise", 576, 160, 960, 1, False, False)]
    + [("full", 960, 160, 960, 1, True, False)] * 2
    + [("full", 960, 208, 1280, 1, False, True)]
)


def test_block_list_at_width_one():
    specs = MobileNeXt().block_specs()
    got = [(s.plan.case, s.in_channels, s.plan.hidden, s.out_channels, s.stride, s.plan.identity, s.keep_3x3)
           for s in specs]
    assert got == BLOCKS_W1
    # The parameters hold exactly the convs of each case, named as the paper draws them.
    params = _params()
    parts = {"first": {"dw1", "pw1", "pw2", "dw2"}, "full": {"dw1", "pw1", "pw2", "dw2"},
             "pointwise": {"pw1", "pw2"}, "pointwise_down": {"pw1", "pw2", "dw2"}}
    for i, (case, inp, hidden, out, _, _, _) in enumerate(BLOCKS_W1):
        block = params[f"blocks_{i}"]
        assert set(block) == parts[case], i
        assert block["pw1"]["conv"]["kernel"].shape == (1, 1, inp, hidden)
        assert block["pw2"]["conv"]["kernel"].shape == (1, 1, hidden, out)
        if "dw1" in block:
            assert block["dw1"]["conv"]["kernel"].shape == (3, 3, 1, inp)
    assert set(params) == {"stem", "classifier"} | {f"blocks_{i}" for i in range(20)}  # no head conv
    assert params["stem"]["conv"]["kernel"].shape == (3, 3, 3, 32)
    assert params["classifier"]["kernel"].shape == (1280, 1000)


@pytest.mark.parametrize("width, stem, outs", [
    (0.5, 16, (48, 72, 96, 144, 192, 288, 480, 1280)),   # 1280 stays below width 1
    (1.4, 48, (136, 200, 272, 400, 536, 808, 1344, 1792)),
    (0.1, 4, (12, 16, 20, 28, 40, 56, 96, 1280)),        # divisor 4 at width 0.1
])
def test_width_rule(width, stem, outs):
    model = MobileNeXt(width_mult=width)
    info = model.feature_info()
    assert info[0] == ("stem", 2, stem)
    assert tuple(i.channels for i in info[1:]) == outs
    assert [i.stride for i in info] == [2, 4, 4, 8, 16, 16, 32, 32, 32]
    assert [i.name for i in info] == ["stem"] + [f"stage{s}" for s in range(8)] and model.num_features == outs[-1]


def test_hidden_width_floor():
    """hidden = inp // t, raised to make_divisible(ceil(oup / 6), 16) below oup / 6."""
    assert sandglass_plan(96, 144, 1, 6, keep_3x3=True).hidden == 16 * 2  # 96 // 6 = 16 < 24 -> 32
    assert sandglass_plan(960, 1280, 1, 6, keep_3x3=True).hidden == 208
    assert sandglass_plan(192, 192, 1, 6).hidden == 32


# -- the partial shortcut --------------------------------------------------------------


def test_partial_identity_adds_x_to_the_first_channels_only():
    block = SandglassBlock(features=12, stride=1, reduction=6)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 12))
    variables = block.init(jax.random.PRNGKey(1), x)

    @functools.partial(jax.jit, static_argnums=0)
    def run(multiplier, x):
        return block.clone(identity_tensor_multiplier=multiplier).apply(variables, x)

    full = np.asarray(run(1.0, x))
    for multiplier, k in ((1 / 2, 6), (1 / 3, 4), (1 / 4, 3)):
        part = np.asarray(run(multiplier, x))
        np.testing.assert_allclose(part[..., :k], full[..., :k], rtol=0, atol=1e-6)
        np.testing.assert_allclose(full[..., k:] - part[..., k:], np.asarray(x)[..., k:], rtol=0, atol=1e-5)


def test_identity_div_validates():
    assert [identity_div(m) for m in (1, 1.0, 0.5, 1 / 3, 0.25)] == [1, 1, 2, 3, 4]
    for bad in (0.3, 0, -0.5, 2.0, True, "1/2"):
        with pytest.raises(ValueError, match="identity_tensor_multiplier must be 1/k"):
            identity_div(bad)


# -- attention placements --------------------------------------------------------------

# Parameters at width 1.0: SE (reduction 24) and CA (reduction 32) per placement, in the
# 19 blocks after the first. The CA paper prints 3.89M (+SE) and 4.09M (+CA); see
# docs/mobilenext.md.
ATTENTION_COUNTS = {
    ("se", "first_dw"): 3_913_460,
    ("se", "first_dw_or_expand"): 4_042_680,
    ("se", "expand"): 4_102_903,
    ("ca", "first_dw"): 3_970_770,
    ("ca", "first_dw_or_expand"): 4_119_513,
    ("ca", "expand"): 4_188_631,
}


@pytest.mark.parametrize("attention, position", sorted(ATTENTION_COUNTS))
def test_attention_placements(attention, position):
    params = _params(f"mobilenext_{attention}", attention_position=position)
    assert _count(params) == ATTENTION_COUNTS[attention, position]
    gate = "gate_h" if attention == "ca" else "expand"
    for i, spec in enumerate(MobileNeXt().block_specs()):
        block = params[f"blocks_{i}"]
        if spec.plan.case == "first" or (position == "first_dw" and not spec.plan.first_dw):
            assert "attention" not in block, i
            continue
        # After the first depthwise conv: the block's input width; after the expand conv: its output width.
        after_dw = spec.plan.first_dw and position != "expand"
        width = spec.in_channels if after_dw else spec.out_channels
        assert block["attention"][gate]["bias"].shape == (width,), i


def test_registered_attention_variants_use_the_authors_placement():
    assert _count(_params("mobilenext_ca")) == ATTENTION_COUNTS["ca", "first_dw"]
    assert _count(_params("mobilenext_se")) == ATTENTION_COUNTS["se", "first_dw"]


@pytest.mark.parametrize("inp, out, stride, position", [
    (16, 16, 1, "expand"),                 # between pw2 and dw2: two units, not the fused pair
    (16, 24, 2, "first_dw_or_expand"),     # a block without dw1: after pw2, then dw2 at stride 2
])
def test_attention_after_the_expand_conv_runs_fused_and_plain(inp, out, stride, position):
    """Eval outputs equal with and without the fused CPU units (the registry test covers
    the default placement in whole models)."""
    from ca_flax import fast_paths

    block = SandglassBlock(out, stride, 6, attention="ca", attention_position=position)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, inp))
    variables = block.init(jax.random.PRNGKey(1), x)
    assert "attention" in variables["params"]
    fused = jax.jit(block.apply)(variables, x)
    with fast_paths.disabled():
        plain = jax.jit(block.apply)(variables, x)
    assert fused.shape == (2, 8 // stride, 8 // stride, out)
    np.testing.assert_allclose(fused, plain, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(plain))))


# -- MAdds -------------------------------------------------------------------------------


def test_madds_at_224_within_one_percent():
    summary = summarize(create_model("mobilenext"))
    assert abs(summary.total_madds - 311.3e6) / 311.3e6 < 0.01
    assert summary.total_params == 3_535_416


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"identity_tensor_multiplier": 0.3}, r"identity_tensor_multiplier must be 1/k .* got 0\.3; write 1/3"),
    ({"identity_tensor_multiplier": 2}, "identity_tensor_multiplier must be 1/k"),
    ({"attention": "eca"}, r"Unknown attention 'eca'; choose one of \['ca', 'cbam', 'se'\]"),
    ({"attention": "ca", "attention_position": "after_pw1"},
     r"Unknown attention_position 'after_pw1'; choose one of \['first_dw', 'first_dw_or_expand', 'expand'\]"),
    ({"stage_repeats": (1,) * 7}, r"stage_repeats must be 8 positive integers .*\(1, 1, 3, 3, 4, 4, 3, 1\)"),
    ({"width_mult": 0}, "width_mult must be a positive finite number"),
    ({"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\)"),
])
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model("mobilenext", **kwargs)


def test_bad_block_shapes_are_named():
    with pytest.raises(ValueError, match="stride 1 or 2, got 3"):
        sandglass_plan(32, 64, 3, 6)
    with pytest.raises(ValueError, match=r"inp == oup \(64\) or keep_3x3 has stride 1 .* got stride 2"):
        sandglass_plan(64, 64, 2, 6)
