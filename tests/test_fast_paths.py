"""The one switch: ``ca_flax.fast_paths.disabled()`` turns every CPU fast path off."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ca_flax import fast_paths, native
from ca_flax.layers.conv import resolve_full_conv_impl
from ca_flax.layers.depthwise import resolve_impl
from ca_flax.models import create_model
from ca_flax.models.micro_batch import resolve_eval_micro_batch

TINY = dict(width_mult=0.25, stage_repeats=(1, 1, 1, 1, 1, 1, 1), num_classes=10)


def test_every_layer_choice_is_plain_inside_the_block_and_restored_after():
    before = (resolve_impl("auto", "cpu"), resolve_full_conv_impl("auto", (3, 3, 3, 32), "cpu"),
              resolve_eval_micro_batch("auto", "cpu"), native.enabled())
    assert before[:3] == ("shift_vjp", "patches", 8)
    with fast_paths.disabled():
        assert not fast_paths.enabled() and not native.enabled()
        # Explicit choices too: inspection wants plain modules whatever the model asks.
        assert {resolve_impl(impl, "cpu") for impl in ("auto", "shift", "shift_vjp", "xla")} == {"xla"}
        assert {resolve_full_conv_impl(impl, (3, 3, 3, 32), "cpu") for impl in ("auto", "patches")} == {"xla"}
        assert resolve_eval_micro_batch("auto", "cpu") is None and resolve_eval_micro_batch(4) is None
        with pytest.raises(ValueError, match="Unknown depthwise implementation"):
            resolve_impl("fast")
    assert (resolve_impl("auto", "cpu"), resolve_full_conv_impl("auto", (3, 3, 3, 32), "cpu"),
            resolve_eval_micro_batch("auto", "cpu"), native.enabled()) == before


@pytest.mark.parametrize("depthwise_impl", ["auto", "shift"])
def test_a_model_traced_inside_the_block_is_plain_xla(depthwise_impl):
    model = create_model("mobilenetv2_ca", depthwise_impl=depthwise_impl, **TINY)
    x = jnp.zeros((16, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    with fast_paths.disabled():
        plain = jax.jit(model.apply).lower(variables, x).as_text()
    fast = jax.jit(model.apply).lower(variables, x).as_text()
    assert "custom_call" not in plain and "while" not in plain  # no native kernel, no micro-batch loop
    # One convolution per depthwise layer and for the stem; 1x1 convolutions stay matmuls.
    depthwise_layers = len(model.block_specs())
    assert plain.count("stablehlo.convolution") == depthwise_layers + 1
    if jax.default_backend() == "cpu":
        assert "while" in fast  # the single-device CPU default micro-batches
        if native.depthwise_inference_target() is not None:  # an explicit implementation is honoured
            assert ("CaFlaxDepthwiseInference" in fast) == (depthwise_impl == "auto")
    with fast_paths.disabled():
        plain_out = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(plain_out, jax.jit(model.apply)(variables, x), rtol=1e-5, atol=1e-6)


def test_capture_intermediates_inside_the_block_sees_every_module():
    model = create_model("mobilenetv2_ca", **TINY)
    x = jnp.zeros((2, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    with fast_paths.disabled():
        _, state = jax.jit(functools.partial(model.apply, capture_intermediates=True, mutable=["intermediates"]))(
            variables, x)
    names = {"/".join(map(str, path)) for path in jax.tree_util.tree_flatten_with_path(state)[0]}
    assert any("blocks_1" in n and "expand" in n for n in map(str, names))
    assert any("attention" in n and "a_h" in n for n in map(str, names))
