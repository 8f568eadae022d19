"""Reading PyTorch checkpoints safely: formats, wrappers, and every kind of bad input.

No XLA compilation here: only loading, key mapping and shape inference.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))

import torch_reference as tr  # noqa: E402

from ca_flax.convert import ConversionError, from_torch, load_state_dict, read_safetensors, save_state_dict  # noqa: E402


@pytest.fixture(scope="module")
def state_dict() -> dict:
    """The authors' MobileNetV2+CA at width 0.5, random weights and statistics."""
    return tr.randomize_(tr.OfficialMBV2CA(width_mult=0.5, num_classes=10), seed=0).state_dict()


def _numpy(sd: dict) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in sd.items()}


def _assert_same_arrays(loaded: dict[str, np.ndarray], sd: dict) -> None:
    assert sorted(loaded) == sorted(sd)  # safetensors stores keys sorted
    for key, value in sd.items():
        assert loaded[key].dtype == value.numpy().dtype, key
        np.testing.assert_array_equal(loaded[key], value.numpy(), err_msg=key)


# -- formats ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".safetensors", ".npz"])
def test_every_format_loads_the_same_arrays(tmp_path, state_dict, suffix):
    path = save_state_dict(_numpy(state_dict), tmp_path / f"weights{suffix}")
    _assert_same_arrays(load_state_dict(path).arrays, state_dict)


def test_pth_tar_training_checkpoint(tmp_path, state_dict):
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 10, "state_dict": dict(state_dict), "metric": 71.2}, path)
    _assert_same_arrays(load_state_dict(path).arrays, state_dict)


def test_in_memory_tensors_and_numpy_arrays(state_dict):
    _assert_same_arrays(load_state_dict(state_dict).arrays, state_dict)
    _assert_same_arrays(load_state_dict(_numpy(state_dict)).arrays, state_dict)


@pytest.mark.parametrize(
    "wrap, note",
    [
        (lambda sd: {"state_dict": sd, "epoch": 3}, "'state_dict'"),
        (lambda sd: {"model": sd, "optimizer": {"lr": 0.1}}, "'model'"),
        (lambda sd: {"state_dict_ema": sd}, "'state_dict_ema'"),
        (lambda sd: {f"module.{k}": v for k, v in sd.items()}, "'module.'"),
        (lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}, "'_orig_mod.'"),
        (lambda sd: {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, "'_orig_mod.'"),
    ],
    ids=["state_dict", "model", "state_dict_ema", "DataParallel", "torch.compile", "nested"],
)
def test_wrappers_and_prefixes_are_unwrapped(state_dict, wrap, note):
    loaded = load_state_dict(wrap(state_dict))
    _assert_same_arrays(loaded.arrays, state_dict)
    assert any(note in n for n in loaded.notes), loaded.notes


def test_ema_weights_preferred_unless_asked(state_dict):
    raw = {k: v.clone() for k, v in state_dict.items()}
    raw["features.0.0.weight"] += 1.0
    wrapped = {"state_dict": raw, "state_dict_ema": state_dict}
    _assert_same_arrays(load_state_dict(wrapped).arrays, state_dict)
    loaded = load_state_dict(wrapped, use_ema=False)
    _assert_same_arrays(loaded.arrays, raw)
    assert any("'state_dict'" in n and "also present: 'state_dict_ema'" in n for n in loaded.notes)


def test_released_head_spelling_classifier_weight(state_dict):
    sd = {k.replace("classifier.1.", "classifier."): v for k, v in state_dict.items()}
    model, variables, report = from_torch(sd)
    np.testing.assert_array_equal(variables["params"]["classifier"]["kernel"], state_dict["classifier.1.weight"].numpy().T)
    assert any("'classifier.weight'" in n for n in report.notes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_upcast_exactly_with_a_note(tmp_path, state_dict, dtype):
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    for source in (half, save_state_dict_torch(half, tmp_path / "half.safetensors")):
        model, variables, report = from_torch(source)
        kernel = variables["params"]["stem"]["conv"]["kernel"]
        assert kernel.dtype == np.float32
        np.testing.assert_array_equal(kernel, half["features.0.0.weight"].float().numpy().transpose(2, 3, 1, 0))
        assert any("upcast to float32" in n for n in report.notes), report.notes


def save_state_dict_torch(sd: dict, path: Path) -> Path:
    """Writes with the safetensors package itself (bf16 included), as users' files are."""
    from safetensors.torch import save_file

    save_file(dict(sd), str(path))
    return path


def test_safetensors_reader_matches_the_library(tmp_path, state_dict):
    from safetensors.numpy import load_file

    path = save_state_dict_torch(state_dict, tmp_path / "w.safetensors")
    ours, theirs = read_safetensors(path), load_file(str(path))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key])


def test_safetensors_and_npz_need_no_torch(tmp_path, state_dict, monkeypatch):
    st = save_state_dict(_numpy(state_dict), tmp_path / "w.safetensors")
    npz = save_state_dict(_numpy(state_dict), tmp_path / "w.npz")
    pth = save_state_dict(_numpy(state_dict), tmp_path / "w.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    _assert_same_arrays(load_state_dict(st).arrays, state_dict)
    _assert_same_arrays(load_state_dict(npz).arrays, state_dict)
    with pytest.raises(ConversionError, match=r"w\.pth: .*pip install torch"):
        load_state_dict(pth)
    with pytest.raises(ConversionError, match="pip install torch"):
        save_state_dict(_numpy(state_dict), tmp_path / "out.pth")


# -- bad files -------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_missing_file(tmp_path):
    assert issubclass(ConversionError, ValueError)
    with pytest.raises(ConversionError, match=r"nope\.pth: no such file"):
        from_torch(tmp_path / "nope.pth")


def test_directory(tmp_path):
    with pytest.raises(ConversionError, match="is a directory, not a checkpoint file"):
        from_torch(tmp_path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_empty_file(tmp_path, suffix):
    path = _write(tmp_path / f"empty{suffix}", b"")
    with pytest.raises(ConversionError, match=f"empty{suffix}: the file is empty"):
        from_torch(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_truncated_file(tmp_path, state_dict, suffix):
    whole = save_state_dict(_numpy(state_dict), tmp_path / f"whole{suffix}").read_bytes()
    path = _write(tmp_path / f"cut{suffix}", whole[: len(whole) * 2 // 3])
    with pytest.raises(ConversionError, match=f"cut{suffix}: .*(truncated|corrupt)"):
        from_torch(path)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors", ".npz"])
def test_not_a_checkpoint_at_all(tmp_path, suffix):
    path = _write(tmp_path / f"notes{suffix}", b"These are my notes, not a checkpoint.\n" * 20)
    with pytest.raises(ConversionError, match=f"notes{suffix}: (not|cannot)"):
        from_torch(path)


def test_unknown_suffix(tmp_path):
    path = _write(tmp_path / "model.onnx", b"\x08\x07")
    with pytest.raises(ConversionError, match=r"unknown file type '\.onnx'; supported: \.pth"):
        from_torch(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2, 3], "holds a list, not a dict of tensors"),
        ({"epoch": 3, "lr": 0.1}, "no tensors found"),
        ({"optimizer": {"lr": 0.1}}, "no state dict found: the top-level keys are \\['optimizer'\\]"),
        ({}, "the state dict is empty"),
    ],
    ids=["list", "no-tensors", "no-wrapper", "empty-dict"],
)
def test_pickles_without_weights(tmp_path, content, message):
    path = tmp_path / "other.pth"
    torch.save(content, path)
    with pytest.raises(ConversionError, match=f"other.pth: .*{message}"):
        from_torch(path)


def test_wrong_source_type():
    with pytest.raises(ConversionError, match="Cannot convert a list"):
        from_torch([1, 2])


def test_entry_that_is_not_a_tensor(state_dict):
    sd = dict(state_dict, **{"features.0.0.weight": [[1.0]]})
    with pytest.raises(ConversionError, match="entry 'features.0.0.weight' is a list, not a tensor"):
        from_torch(sd)


class _Payload:
    """Unpickling this creates a directory: the proof that code from the file ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickled_code_is_never_executed(tmp_path, state_dict):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": dict(state_dict), "payload": _Payload(str(marker))}, path)
    with pytest.raises(ConversionError, match=r"evil\.pth: refused to load.*\bos\.makedirs") as info:
        from_torch(path)
    assert not marker.exists()
    assert "safetensors" in str(info.value)


def test_training_checkpoint_with_argparse_namespace_is_refused_with_the_global(tmp_path, state_dict):
    path = tmp_path / "train.pth"
    torch.save({"state_dict": dict(state_dict), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ConversionError, match=r"train\.pth: refused to load.*argparse\.Namespace.*safetensors") as info:
        from_torch(path)
    assert "['state_dict']" in str(info.value) and "model.state_dict()" not in str(info.value)


def test_whole_pickled_model_is_refused_with_the_state_dict_hint(tmp_path):
    """``torch.save(model)`` instead of ``torch.save(model.state_dict())``: no key of the
    file holds the weights, so the hint is to save ``model.state_dict()``."""
    path = tmp_path / "whole.pth"
    torch.save(tr.OfficialMBV2CA(width_mult=0.35, num_classes=4), path)
    with pytest.raises(ConversionError, match=r"whole\.pth: refused to load") as info:
        from_torch(path)
    message = str(info.value)
    assert "whole pickled torch_reference.OfficialMBV2CA object" in message
    assert "torch.save(model.state_dict(), 'weights.pth')" in message and "['state_dict']" not in message


def test_nan_and_inf_are_refused(state_dict):
    sd = dict(state_dict)
    sd["features.3.conv.0.weight"] = sd["features.3.conv.0.weight"].clone()
    sd["features.3.conv.0.weight"][0, 0] = float("nan")
    sd["conv.1.running_var"] = sd["conv.1.running_var"].clone()
    sd["conv.1.running_var"][:3] = float("inf")
    with pytest.raises(ConversionError, match=r"NaN or Inf values in features\.3\.conv\.0\.weight \(1 of .*conv\.1\.running_var \(3 of"):
        from_torch(sd)


def test_non_float_tensors_are_refused(state_dict):
    sd = dict(state_dict)
    sd["features.0.0.weight"] = (sd["features.0.0.weight"] * 100).to(torch.int8)
    with pytest.raises(ConversionError, match=r"non-float tensors .*features\.0\.0\.weight \(int8\)"):
        from_torch(sd)


def test_float_batch_counter_is_refused(state_dict):
    sd = dict(state_dict, **{"features.0.1.num_batches_tracked": torch.tensor(1.5)})
    with pytest.raises(ConversionError, match=r"features\.0\.1\.num_batches_tracked \(float32\)"):
        from_torch(sd)


# -- writing ---------------------------------------------------------------------------


def test_save_refuses_to_overwrite_and_leaves_no_temporary_files(tmp_path, state_dict):
    path = save_state_dict(_numpy(state_dict), tmp_path / "w.npz")
    with pytest.raises(ConversionError, match="already exists"):
        save_state_dict(_numpy(state_dict), path)
    save_state_dict({"a": np.zeros(2, np.float32)}, path, overwrite=True)
    assert list(load_state_dict(path).arrays) == ["a"]
    with pytest.raises(ConversionError, match="unknown output type '.h5'"):
        save_state_dict(_numpy(state_dict), tmp_path / "w.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npz"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.numpy

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_state_dict({"a": np.zeros(2, np.float32)}, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []
