"""Checks that the PyTorch reference models reproduce the recorded state_dict layouts.

Each fixture in ``tests/fixtures/layouts/`` lists every state_dict key of a real
PyTorch MobileNetV2 (authors' MBV2+CA, torchvision, timm) or MobileNeXt (authors') with shape and dtype, in
order. The reference modules in ``torch_reference.py`` must match them exactly, run a
forward pass and expose feature maps at the expected strides.
"""

import json
import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:  # works whether or not tests/ is a package
    sys.path.insert(0, str(_TESTS_DIR))

import torch_reference as tr  # noqa: E402

LAYOUT_DIR = _TESTS_DIR / "fixtures" / "layouts"
LAYOUT_FILES = sorted(LAYOUT_DIR.glob("*.json"))


def _load(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def test_all_layouts_present():
    assert sorted(p.stem for p in LAYOUT_FILES) == sorted(tr.LAYOUT_NAMES + tr.MNEXT_LAYOUT_NAMES)


@pytest.mark.parametrize("v, divisor, expected", [(32 * 0.5, 8, 16), (1280 * 1.4, 8, 1792), (24 * 1.1, 8, 24), (64 * 1.1, 8, 72), (3.0, 8, 8), (96 * 0.35, 8, 32), (32 * 0.1, 4, 4)])
def test_make_divisible(v, divisor, expected):
    assert tr.make_divisible(v, divisor) == expected


@pytest.mark.parametrize("path", LAYOUT_FILES, ids=[p.stem for p in LAYOUT_FILES])
def test_state_dict_matches_layout(path):
    layout = _load(path)
    model = tr.build_from_layout_name(path.stem)
    sd = model.state_dict()
    expected_keys = [k for k, _, _ in layout["keys"]]
    assert list(sd.keys()) == expected_keys
    for name, shape, dtype in layout["keys"]:
        assert list(sd[name].shape) == shape, name
        assert str(sd[name].dtype).replace("torch.", "") == dtype, name
    assert sum(p.numel() for p in model.parameters()) == layout["num_params"]
    assert len(sd) == layout["num_keys"]


@pytest.mark.parametrize("path", LAYOUT_FILES, ids=[p.stem for p in LAYOUT_FILES])
def test_forward_and_feature_strides(path):
    model = tr.randomize_(tr.build_from_layout_name(path.stem, num_classes=10), seed=0).eval()
    size = 64
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
    assert logits.shape == (1, 10)
    assert torch.isfinite(logits).all()
    mnext = isinstance(model, tr.OfficialMobileNeXt)  # no head conv: the last stage is pooled
    names, strides = (tr.MNEXT_FEATURE_NAMES, tr.MNEXT_FEATURE_STRIDES) if mnext else (tr.FEATURE_NAMES, tr.FEATURE_STRIDES)
    assert list(feats) == list(names)
    for name, fmap in feats.items():
        stride = strides[name]
        expected_hw = math.ceil(size / stride)
        assert fmap.shape[0] == 1 and fmap.shape[2:] == (expected_hw, expected_hw), name
        assert torch.isfinite(fmap).all(), name
    # The pooled head feeds the classifier, so forward must agree with forward_features.
    assert feats[names[-1]].shape[1] == model.state_dict()[_classifier_weight_key(model)].shape[1]


def _classifier_weight_key(model) -> str:
    keys = [k for k in model.state_dict() if k.startswith("classifier") and k.endswith("weight")]
    assert len(keys) == 1
    return keys[0]


def test_randomize_is_deterministic_and_covers_everything():
    a = tr.randomize_(tr.OfficialMBV2CA(width_mult=0.5, num_classes=10), seed=3)
    b = tr.randomize_(tr.OfficialMBV2CA(width_mult=0.5, num_classes=10), seed=3)
    ref = tr.OfficialMBV2CA(width_mult=0.5, num_classes=10)  # default init
    sa, sb, sr = a.state_dict(), b.state_dict(), ref.state_dict()
    for key, value in sa.items():
        assert torch.equal(value, sb[key]), key
        if key.endswith("num_batches_tracked"):
            continue
        # Every float tensor (biases, BN affine and running stats included) changed.
        assert not torch.equal(value, sr[key]), key
        if key.endswith("running_var"):
            assert (value > 0).all(), key


def test_coordatt_matches_definition():
    """CoordAtt output equals x * sigmoid(conv2(y_h)) * sigmoid(conv3(y_w)), eval mode."""
    ca = tr.randomize_(tr.CoordAtt(16, 16), seed=5).eval()
    x = torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ca(x)
        x_h = x.mean(dim=3, keepdim=True)  # N C H 1
        x_w = x.mean(dim=2, keepdim=True)  # N C 1 W
        y_h = ca.relu(ca.bn1(ca.conv1(x_h)))
        y_w = ca.relu(ca.bn1(ca.conv1(x_w)))
        expected = x * torch.sigmoid(ca.conv2(y_h)) * torch.sigmoid(ca.conv3(y_w))
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_randomized_outputs_depend_on_input():
    """BN calibration keeps the signal alive: logits must vary clearly across inputs."""
    model = tr.randomize_(tr.OfficialMBV2CA(width_mult=0.5, num_classes=10), seed=0).eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
    assert logits.std(dim=0).mean() > 0.1 * logits.std()
    for name, fmap in feats.items():
        assert fmap.std(dim=0).mean() > 0.2 * fmap.std(), name


def test_randomize_preserves_mode_and_counters():
    model = tr.OfficialMBV2CA(width_mult=0.5, num_classes=10)
    tr.randomize_(model, seed=1)
    assert all(m.training for m in model.modules())
    tracked = [v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")]
    assert all(int(t) == 0 for t in tracked)


@pytest.mark.parametrize("tv_name, timm_name", [("torchvision_mobilenet_v2_w1.0", "timm_mobilenetv2_100"), ("torchvision_mobilenet_v2_w0.5", "timm_mobilenetv2_050")])
def test_torchvision_and_timm_are_the_same_network(tv_name, timm_name):
    """Same architecture, same parameter order: equal seeds must give equal outputs."""
    tv = tr.randomize_(tr.build_from_layout_name(tv_name), seed=4).eval()
    tm = tr.randomize_(tr.build_from_layout_name(timm_name), seed=4).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(tv(x), tm(x))
        ftv, ftm = tv.forward_features(x), tm.forward_features(x)
    for name in tr.FEATURE_NAMES:
        torch.testing.assert_close(ftv[name], ftm[name])
