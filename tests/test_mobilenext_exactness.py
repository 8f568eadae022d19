"""MobileNeXt against the authors' PyTorch model (tests/torch_reference.py's
OfficialMobileNeXt, itself checked key by key against the recorded layouts in
tests/test_torch_reference.py), through the converter: the configuration read off the
shapes, float32 logits and maps at an even and an odd size, the half shortcut, float64
to 1e-10, and the released checkpoint's wrapping. The converter's round trip is in
tests/test_convert_layouts.py.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))

import torch_reference as tr  # noqa: E402

from ca_flax import native  # noqa: E402
from ca_flax.convert import ConversionError, from_torch, to_torch  # noqa: E402
from ca_flax.models import MobileNeXt, create_model  # noqa: E402

# Every case of the block table: t == 2, keep_3x3 (stages 1 and 7), no first depthwise
# (stages 2, 3, 5), no depthwise at all (stages 4, 6), shortcut blocks (the repeats).
TINY_REPEATS = (1, 1, 2, 2, 1, 2, 2, 1)


@functools.lru_cache(maxsize=None)
def _official(identity_div: int = 1) -> torch.nn.Module:
    model = tr.OfficialMobileNeXt(num_classes=10, width_mult=0.25, identity_div=identity_div,
                                  stage_repeats=TINY_REPEATS)
    return tr.randomize_(model, seed=0).eval()


def _relative(have, want) -> float:
    want = want.numpy() if want.ndim == 2 else want.numpy().transpose(0, 2, 3, 1)
    have = np.asarray(have)
    assert have.shape == want.shape and have.dtype == want.dtype
    return float(np.max(np.abs(have - want)) / np.max(np.abs(want)))


def _compare(reference, model, variables, x: torch.Tensor) -> dict[str, float]:
    """Relative errors of the logits and every map; the call as users make it (on CPU:
    the fused inference units wherever float32 allows)."""
    with torch.no_grad():
        want = {"logits": reference(x), **reference.forward_features(x)}

    @jax.jit
    def run(variables, x):
        return model.apply(variables, x), model.apply(variables, x, method=model.features)

    logits, maps = run(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    assert sorted(maps) == sorted(tr.MNEXT_FEATURE_NAMES)
    return {name: _relative({"logits": logits, **maps}[name], value) for name, value in want.items()}


def _images(size: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size), dtype=dtype)


def test_converted_config():
    model, variables, report = from_torch(_official().state_dict())
    assert report.layout == "official_mnext" and isinstance(model, MobileNeXt)
    assert (model.width_mult, tuple(model.stage_repeats), model.num_classes) == (0.25, TINY_REPEATS, 10)
    assert {s.plan.case for s in model.block_specs()} == {"first", "full", "pointwise", "pointwise_down"}
    count = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(variables["params"]))
    assert count == sum(p.numel() for p in _official().parameters())


@pytest.mark.parametrize("size", [32, 33])
def test_float32_logits_and_maps_match_pytorch(size):
    reference = _official()
    model, variables, _ = from_torch(reference.state_dict())
    errors = _compare(reference, model, variables, _images(size))
    assert errors["logits"] < 1e-4, errors
    assert max(errors.values()) < 5e-4, errors
    if jax.default_backend() == "cpu" and native.expand_depthwise_inference_target() is not None:
        # What was compared is the fused path: dw2 with its producer pw2 in one kernel.
        images = jnp.zeros((2, size, size, 3))
        assert "CaFlaxExpandDepthwiseInference" in jax.jit(model.apply).lower(variables, images).as_text()


def test_outputs_depend_on_the_input():
    """Guards the comparisons: a network whose logits ignored the image would match anything."""
    with torch.no_grad():
        logits = _official()(_images(33)).numpy()
    assert logits.std(axis=0).mean() > 0.1 * logits.std()


def test_half_identity_matches_pytorch():
    """The shortcut fraction is not in the weights: set it on the converted model."""
    reference = _official(identity_div=2)
    model, variables, _ = from_torch(reference.state_dict())
    errors = _compare(reference, model.clone(identity_tensor_multiplier=0.5), variables, _images(33))
    assert errors["logits"] < 1e-4, errors
    full = _compare(reference, model, variables, _images(33))  # the full shortcut is another network
    assert full["logits"] > 1e-2


def test_float64_matches_pytorch():
    with jax.enable_x64(True):
        reference = copy.deepcopy(_official()).double()
        model, variables, _ = from_torch(reference.state_dict())
        errors = _compare(reference, model, variables, _images(33, torch.float64))
    assert max(errors.values()) < 1e-10, errors


def test_released_checkpoint_wrapping(tmp_path):
    """model_best.pth.tar: EMA weights are preferred; the pickled argparse.Namespace is refused
    with the way out."""
    raw = tr.randomize_(tr.OfficialMobileNeXt(num_classes=10, width_mult=0.25, stage_repeats=TINY_REPEATS),
                        seed=1, calibrate=False).state_dict()
    ema = tr.randomize_(tr.OfficialMobileNeXt(num_classes=10, width_mult=0.25, stage_repeats=TINY_REPEATS),
                        seed=2, calibrate=False).state_dict()
    wrapped = {"state_dict": raw, "state_dict_ema": ema, "epoch": 199, "arch": "mobilenext", "optimizer": {}}
    path = tmp_path / "model_best.pth.tar"
    torch.save(wrapped, path)
    _, variables, report = from_torch(path)
    assert report.layout == "official_mnext"
    np.testing.assert_array_equal(variables["params"]["stem"]["conv"]["kernel"],
                                  ema["features.0.0.weight"].numpy().transpose(2, 3, 1, 0))
    _, raw_variables, _ = from_torch(path, use_ema=False)
    np.testing.assert_array_equal(raw_variables["params"]["stem"]["conv"]["kernel"],
                                  raw["features.0.0.weight"].numpy().transpose(2, 3, 1, 0))

    torch.save({**wrapped, "args": argparse.Namespace(arch="mobilenext", lr=0.1)}, path)
    with pytest.raises(ConversionError, match=r"refused to load.*argparse\.Namespace") as info:
        from_torch(path)
    assert "['state_dict']" in str(info.value)


def test_attention_models_do_not_export_to_the_official_layout():
    model = create_model("mobilenext_ca", width_mult=0.25, stage_repeats=(1,) * 8, num_classes=10)
    with pytest.raises(ConversionError, match="attention='ca' \\(the authors' MobileNeXt has none\\)"):
        to_torch(model, {}, "official_mnext")


def test_command_line_round_trip_finds_the_layout(tmp_path):
    """``python -m ca_flax.convert`` both ways; a MobileNeXt checkpoint that records no
    layout is written in its family's only one."""
    from ca_flax.convert.__main__ import main
    from ca_flax.convert.io import load_state_dict

    sd = tr.randomize_(tr.OfficialMobileNeXt(num_classes=4, width_mult=0.25, stage_repeats=TINY_REPEATS),
                       seed=3, calibrate=False).state_dict()
    torch.save(sd, tmp_path / "mnext.pth")
    assert main(["-q", str(tmp_path / "mnext.pth"), str(tmp_path / "ckpt")]) == 0
    meta = tmp_path / "ckpt" / "model.json"
    text = meta.read_text()
    assert '"layout": "official_mnext"' in text
    meta.write_text(text.replace('"layout": "official_mnext"', '"layout": null'))
    assert main(["-q", "--to-torch", str(tmp_path / "ckpt"), str(tmp_path / "back.npz")]) == 0
    back = load_state_dict(tmp_path / "back.npz").arrays
    fresh = tr.OfficialMobileNeXt(num_classes=4, width_mult=0.25, stage_repeats=TINY_REPEATS)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    for key, value in sd.items():
        assert torch.equal(fresh.state_dict()[key], value), key


@functools.lru_cache(maxsize=None)
def _ca_official() -> torch.nn.Module:
    model = tr.OfficialMobileNeXt(num_classes=10, width_mult=0.25, stage_repeats=TINY_REPEATS, coord_att=True)
    return tr.randomize_(model, seed=3).eval()


def _split_ca(state: dict) -> tuple[dict, dict]:
    """The CA reference's state dict as the official layout (CA removed, later indices
    shifted back by one) and, per block index, its CA tensors."""
    plain, attention = {}, {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and len(parts) > 4 and parts[2] == "conv":
            block, index = int(parts[1]), int(parts[3])
            has_ca = isinstance(_ca_official().features[block].conv[3], tr.CoordAtt)
            if has_ca and index == 3:
                attention.setdefault(block, {})[".".join(parts[4:])] = value
                continue
            if has_ca and index > 3:
                key = ".".join(parts[:3] + [str(index - 1)] + parts[4:])
        plain[key] = value
    return plain, attention


def test_mobilenext_ca_matches_its_pytorch_counterpart():
    """mobilenext_ca against the PyTorch model the benchmark times (OfficialMobileNeXt with
    coord_att: the authors' CoordAtt after the first depthwise conv): the same parameter
    count at width 1.0 and the same logits; the official parts go through the converter,
    the CA blocks through the MobileNetV2+CA converter's map."""
    from ca_flax.convert.mobilenetv2 import _CA_PARTS
    from ca_flax.convert.layouts import ModuleMap, tensor_map, to_flax

    full = tr.OfficialMobileNeXt(num_classes=1000, coord_att=True)
    flax_full = create_model("mobilenext_ca")
    shapes = jax.eval_shape(functools.partial(flax_full.init, train=False), jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert sum(p.numel() for p in full.parameters()) == sum(
        int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes["params"]))

    reference = _ca_official()
    plain_state, attention = _split_ca(reference.state_dict())
    plain, variables, _ = from_torch(plain_state)
    model = plain.clone(attention="ca")
    variables = jax.tree_util.tree_map(np.asarray, variables)
    variables = {k: jax.tree_util.tree_map(np.copy, dict(v)) for k, v in variables.items()}
    for block, tensors in attention.items():
        mods = [ModuleMap(t, (f"blocks_{block - 1}", "attention", f), kind) for t, f, kind in _CA_PARTS]
        for tmap in tensor_map(mods):
            if tmap.collection is None:
                continue
            node = variables[tmap.collection]
            for name in tmap.path[:-1]:
                node = node.setdefault(name, {})
            node[tmap.path[-1]] = to_flax(tmap.transform, tensors[tmap.key].numpy())
    expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                              jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert jax.tree_util.tree_structure(expected) == jax.tree_util.tree_structure(variables)
    errors = _compare(reference, model, variables, _images(33))
    assert errors["logits"] < 1e-4, errors
    assert max(errors.values()) < 5e-4, errors
