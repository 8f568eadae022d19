"""Key mapping for every recorded layout: detection, configuration inference, the round
trip torch -> ca-flax -> torch (bit-identical, loads strictly), fine-tuning heads, and the
errors for keys and shapes that do not fit. Shape inference only; nothing is compiled.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))

import torch_reference as tr  # noqa: E402

from ca_flax.checkpoints import abstract_variables  # noqa: E402
from ca_flax.convert import ConversionError, from_torch, to_torch  # noqa: E402
from ca_flax.models import MobileNetV2, MobileNeXt, create_model  # noqa: E402

LAYOUT_DIR = _TESTS_DIR / "fixtures" / "layouts"
# Fixture -> (layout, the registered ca-flax model with the same architecture).
EXPECTED = {
    "official_mbv2_ca_w0.5": ("official", create_model("mobilenetv2_ca", width_mult=0.5)),
    "official_mbv2_ca_w1.0": ("official", create_model("mobilenetv2_ca")),
    "torchvision_mobilenet_v2_w0.5": ("torchvision", create_model("mobilenetv2_050")),
    "torchvision_mobilenet_v2_w1.0": ("torchvision", create_model("mobilenetv2_100")),
    "timm_mobilenetv2_050": ("timm", create_model("mobilenetv2_050")),
    "timm_mobilenetv2_100": ("timm", create_model("mobilenetv2_100")),
    "timm_mobilenetv2_140": ("timm", create_model("mobilenetv2_140")),
    "timm_mobilenetv2_110d": ("timm", create_model("mobilenetv2_110d")),
    "timm_mobilenetv2_120d": ("timm", create_model("mobilenetv2_120d")),
    "official_mnext_w0.5": ("official_mnext", create_model("mobilenext", width_mult=0.5)),
    "official_mnext_w1.0": ("official_mnext", create_model("mobilenext")),
}


def test_every_fixture_is_covered():
    assert sorted(EXPECTED) == sorted(p.stem for p in LAYOUT_DIR.glob("*.json"))


@functools.lru_cache(maxsize=None)
def _reference_state_dict(name: str, seed: int = 0) -> dict:
    """Random weights without the calibration forward pass (not needed for key mapping)."""
    model = tr.build_from_layout_name(name)
    return tr.randomize_(model, seed=seed, calibrate=False).state_dict()


def _architecture(model: MobileNetV2 | MobileNeXt) -> tuple:
    head = getattr(model, "head_width", None)  # MobileNeXt has no head conv
    return (model.block_specs(), model.stem_width, head, model.attention, model.in_channels, model.num_classes)


def _param_count(tree) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_round_trip_is_bit_identical_and_loads_strictly(name):
    layout_json = json.loads((LAYOUT_DIR / f"{name}.json").read_text())
    sd = _reference_state_dict(name)
    model, variables, report = from_torch(sd)

    layout, registered = EXPECTED[name]
    assert report.layout == layout
    assert _architecture(model) == _architecture(registered)
    assert _param_count(variables["params"]) == layout_json["num_params"]
    assert len(report.mapped) + len(report.ignored) == layout_json["num_keys"]
    assert {reason for _, reason in report.ignored} == {"BatchNorm batch counter; ca-flax keeps no counter"}

    exported = to_torch(model, variables, layout)
    assert [[k, list(v.shape), v.dtype.name] for k, v in exported.items()] == layout_json["keys"]
    for key, value in sd.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    fresh = tr.build_from_layout_name(name)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, sd[key]), key


def test_variables_have_the_documented_names():
    model, variables, _ = from_torch(_reference_state_dict("official_mbv2_ca_w0.5"))
    params, stats = variables["params"], variables["batch_stats"]
    assert params["stem"]["conv"]["kernel"].shape == (3, 3, 3, 16)
    assert "expand" not in params["blocks_0"]
    assert params["blocks_0"]["depthwise"]["conv"]["kernel"].shape == (3, 3, 1, 16)
    ca = params["blocks_1"]["attention"]
    assert ca["reduce"]["kernel"].shape == (1, 1, 48, 8) and ca["reduce"]["bias"].shape == (8,)
    assert ca["gate_h"]["kernel"].shape == ca["gate_w"]["kernel"].shape == (1, 1, 8, 48)
    assert set(stats["blocks_1"]["attention"]["bn"]) == {"mean", "var"}
    assert params["classifier"]["kernel"].shape == (1280, 1000)


def test_mapping_follows_the_torch_modules():
    """conv -> HWIO, depthwise -> (3, 3, 1, C), Linear -> (in, out), CA conv2 -> gate_h."""
    sd = _reference_state_dict("official_mbv2_ca_w0.5")
    _, variables, report = from_torch(sd)
    params, stats = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(params["blocks_2"]["expand"]["conv"]["kernel"], sd["features.3.conv.0.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["blocks_2"]["depthwise"]["conv"]["kernel"][:, :, 0, :], sd["features.3.conv.3.weight"].numpy()[:, 0].transpose(1, 2, 0))
    np.testing.assert_array_equal(params["blocks_2"]["attention"]["gate_h"]["bias"], sd["features.3.conv.6.conv2.bias"].numpy())
    np.testing.assert_array_equal(params["blocks_2"]["attention"]["gate_w"]["bias"], sd["features.3.conv.6.conv3.bias"].numpy())
    np.testing.assert_array_equal(stats["head"]["bn"]["var"], sd["conv.1.running_var"].numpy())
    np.testing.assert_array_equal(params["classifier"]["kernel"], sd["classifier.1.weight"].numpy().T)
    assert ("features.3.conv.6.conv1.weight", "params/blocks_2/attention/reduce/kernel") in report.mapped


def test_explicit_layout_and_unknown_layout_name():
    sd = _reference_state_dict("timm_mobilenetv2_050")
    assert from_torch(sd, layout="timm")[2].layout == "timm"
    with pytest.raises(ConversionError, match="Unknown layout 'keras'; choose 'auto' or one of official, torchvision, timm"):
        from_torch(sd, layout="keras")
    with pytest.raises(ConversionError, match="missing 'features.0.0.weight'"):
        from_torch(sd, layout="official")


def test_unknown_layout_lists_signatures_and_first_keys():
    resnet = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "bn1.weight": np.ones(64, np.float32), "fc.weight": np.zeros((10, 64), np.float32)}
    with pytest.raises(ConversionError) as info:
        from_torch(resnet)
    message = str(info.value)
    assert "unknown state-dict layout" in message
    assert "official: features.0.0.weight, features.1.conv.0.weight, conv.0.weight" in message
    assert "timm: conv_stem.weight" in message
    assert "'conv1.weight', 'bn1.weight', 'fc.weight'" in message


def test_unknown_layout_hints_at_a_wrapping_prefix():
    sd = {f"backbone.{k}": v for k, v in _reference_state_dict("torchvision_mobilenet_v2_w0.5").items()}
    with pytest.raises(ConversionError, match="Every key starts with 'backbone.'"):
        from_torch(sd)


# -- fine-tuning heads -----------------------------------------------------------------


def test_new_num_classes_keeps_the_backbone_and_says_so():
    sd = _reference_state_dict("torchvision_mobilenet_v2_w0.5")
    _, full, _ = from_torch(sd)
    model, variables, report = from_torch(sd, num_classes=10)
    assert model.num_classes == 10
    assert variables["params"]["classifier"]["kernel"].shape == (1280, 10)
    assert not np.any(variables["params"]["classifier"]["bias"])
    for collection in ("params", "batch_stats"):
        for name in full[collection]:
            if name != "classifier":
                np.testing.assert_array_equal(
                    np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(variables[collection][name])]),
                    np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(full[collection][name])]),
                )
    assert any("initialized afresh for 10 classes" in n and "1000 classes" in n for n in report.notes)
    assert ("classifier.1.weight", "classifier for 1000 classes, replaced (model built with num_classes=10)") in report.ignored


def test_num_classes_zero_drops_the_head_and_headless_files_convert():
    sd = _reference_state_dict("timm_mobilenetv2_050")
    model, variables, report = from_torch(sd, num_classes=0)
    assert model.num_classes == 0 and "classifier" not in variables["params"]
    assert any("dropped" in n for n in report.notes)

    headless = {k: v for k, v in sd.items() if not k.startswith("classifier")}
    model, variables, _ = from_torch(headless)
    assert model.num_classes == 0 and "classifier" not in variables["params"]
    model, variables, report = from_torch(headless, num_classes=5)
    assert variables["params"]["classifier"]["kernel"].shape == (1280, 5)
    assert any("has no classifier" in n for n in report.notes)


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_bad_num_classes(bad):
    with pytest.raises(ConversionError, match="num_classes must be a non-negative integer"):
        from_torch(_reference_state_dict("timm_mobilenetv2_050"), num_classes=bad)


# -- keys and shapes that do not fit -----------------------------------------------------


def test_shape_mismatch_names_key_and_both_shapes():
    sd = dict(_reference_state_dict("official_mbv2_ca_w0.5"))
    sd["features.4.conv.6.conv2.weight"] = torch.zeros(96, 9, 1, 1)
    with pytest.raises(ConversionError, match=r"Shape mismatch: features\.4\.conv\.6\.conv2\.weight: expected \(96, 8, 1, 1\), found \(96, 9, 1, 1\)"):
        from_torch(sd)


def test_inconsistent_hidden_width_is_a_shape_mismatch():
    sd = dict(_reference_state_dict("timm_mobilenetv2_050"))
    sd["blocks.2.1.conv_dw.weight"] = torch.zeros(100, 1, 3, 3)
    with pytest.raises(ConversionError, match=r"blocks\.2\.1\.conv_dw\.weight: expected \(96, 1, 3, 3\), found \(100, 1, 3, 3\)"):
        from_torch(sd)


def test_block_width_that_fits_no_multiplier_names_the_block():
    sd = dict(_reference_state_dict("official_mbv2_ca_w0.5"))
    sd["features.2.conv.7.weight"] = torch.zeros(24, 48, 1, 1)
    with pytest.raises(ConversionError, match="Closest: features.2 outputs 24 channels where width 0.5 gives 16"):
        from_torch(sd)


def test_missing_keys_are_grouped_by_module():
    sd = {k: v for k, v in _reference_state_dict("official_mbv2_ca_w0.5").items() if not k.startswith("features.5.conv.6.bn1.")}
    sd.pop("features.7.conv.0.weight")
    with pytest.raises(ConversionError) as info:
        from_torch(sd)
    message = str(info.value)
    assert "Missing 5 keys in: features.5.conv.6.bn1 (weight, bias, running_mean, running_var); features.7.conv.0 (weight)." in message
    assert "in-memory state dict: the weights do not fit the official layout of MobileNetV2(" in message


def test_missing_batch_counters_are_fine():
    """Old checkpoints (before PyTorch 0.4.1) have no num_batches_tracked."""
    sd = {k: v for k, v in _reference_state_dict("torchvision_mobilenet_v2_w0.5").items() if "num_batches_tracked" not in k}
    model, variables, report = from_torch(sd)
    assert report.ignored == []
    assert len(to_torch(model, variables, "torchvision")) == len(_reference_state_dict("torchvision_mobilenet_v2_w0.5"))


def test_unexpected_keys_strict_and_not():
    sd = dict(_reference_state_dict("timm_mobilenetv2_050"))
    sd["aux_head.fc.weight"] = torch.zeros(10, 20)
    sd["aux_head.fc.bias"] = torch.zeros(10)
    with pytest.raises(ConversionError, match=r"Unexpected 2 keys in: aux_head\.fc \(weight, bias\)\..*strict=False \(CLI: --no-strict\)"):
        from_torch(sd)
    _, _, report = from_torch(sd, strict=False)
    assert ("aux_head.fc.weight", "not part of the layout (strict=False)") in report.ignored


def test_mixed_prefixes_get_a_hint():
    sd = dict(_reference_state_dict("timm_mobilenetv2_050"))
    sd["module.conv_head.weight"] = sd.pop("conv_head.weight")
    with pytest.raises(ConversionError, match=r"Some keys carry a 'module\.' prefix .*and others do not"):
        from_torch(sd, layout="timm")


def test_gap_in_block_numbering():
    sd = {k: v for k, v in _reference_state_dict("torchvision_mobilenet_v2_w0.5").items() if not k.startswith("features.3.")}
    with pytest.raises(ConversionError, match=r"blocks are not numbered consecutively: features\.3 is missing"):
        from_torch(sd)


def test_ca_reduction_is_inferred():
    """A CA model trained with another reduction ratio converts, and says which."""
    model = MobileNetV2(width_mult=0.5, num_classes=10, attention="ca", attention_kwargs={"reduction": 16})
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract_variables(model)
    )
    converted, converted_vars, _ = from_torch(to_torch(model, variables, "official"))
    assert converted.attention_kwargs == {"reduction": 16}
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, variables, converted_vars))


# -- export errors -----------------------------------------------------------------------


def test_to_torch_refuses_what_the_layout_cannot_express():
    sd = _reference_state_dict("official_mbv2_ca_w0.5")
    model, variables, _ = from_torch(sd)
    with pytest.raises(ConversionError, match="torchvision layout has no attention blocks"):
        to_torch(model, variables, "torchvision")
    plain, plain_vars, _ = from_torch(_reference_state_dict("timm_mobilenetv2_050"))
    with pytest.raises(ConversionError, match="official layout is MobileNetV2 with Coordinate Attention"):
        to_torch(plain, plain_vars, "official")
    with pytest.raises(ConversionError, match="activation 'hard_swish'"):
        to_torch(plain.clone(activation="hard_swish"), plain_vars, "timm")
    with pytest.raises(ConversionError, match="no classifier"):
        to_torch(plain.clone(num_classes=0), {c: {k: v for k, v in t.items() if k != "classifier"} for c, t in plain_vars.items()}, "timm")
    with pytest.raises(ConversionError, match="variables do not match the model: missing params/head/bn/scale"):
        broken = {"params": dict(plain_vars["params"]), "batch_stats": plain_vars["batch_stats"]}
        broken["params"]["head"] = {"conv": plain_vars["params"]["head"]["conv"], "bn": {"bias": plain_vars["params"]["head"]["bn"]["bias"]}}
        to_torch(plain, broken, "timm")
    with pytest.raises(ConversionError, match="exports ca-flax MobileNetV2 models"):
        to_torch(object(), plain_vars, "timm")


def test_to_torch_writes_the_batch_counter():
    model, variables, _ = from_torch(_reference_state_dict("timm_mobilenetv2_050"))
    sd = to_torch(model, variables, "timm", num_batches_tracked=1234)
    assert sd["bn1.num_batches_tracked"].dtype == np.int64 and sd["bn1.num_batches_tracked"].shape == ()
    assert int(sd["bn2.num_batches_tracked"]) == 1234


def test_every_layout_belongs_to_one_registered_family():
    """from_torch and to_torch dispatch through the family table (ca_flax/convert/layouts.py)."""
    import dataclasses

    from ca_flax.convert import FAMILIES, LAYOUTS, register_family
    from ca_flax.convert.layouts import family_of_layout

    assert list(FAMILIES) == ["mobilenetv2", "mobilenext"]
    assert {name: family_of_layout(layout).name for name, layout in LAYOUTS.items()} == {
        "official": "mobilenetv2", "torchvision": "mobilenetv2", "timm": "mobilenetv2", "official_mnext": "mobilenext"}
    assert FAMILIES["mobilenetv2"].architecture is MobileNetV2
    assert FAMILIES["mobilenext"].architecture is MobileNeXt
    with pytest.raises(ValueError, match=r"Layout name\(s\) \['timm'\] of family 'other' are taken"):
        register_family(dataclasses.replace(FAMILIES["mobilenetv2"], name="other", layouts=(LAYOUTS["timm"],)))
    assert list(FAMILIES) == ["mobilenetv2", "mobilenext"]  # a refused family leaves the table as it was
