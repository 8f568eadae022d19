"""``python -m ca_flax.convert``: both directions, exit codes, messages, atomic output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

_TESTS_DIR = Path(__file__).resolve().parent
_REPO = _TESTS_DIR.parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))

import torch_reference as tr  # noqa: E402

from ca_flax.checkpoints import load_model, read_metadata  # noqa: E402
from ca_flax.convert import load_state_dict  # noqa: E402
from ca_flax.convert.__main__ import main  # noqa: E402


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return tr.randomize_(tr.OfficialMBV2CA(width_mult=0.5, num_classes=10), seed=0).eval()


@pytest.fixture(scope="module")
def released(tmp_path_factory, reference) -> Path:
    """A checkpoint as users have them: a training wrapper, DataParallel keys, a batch count."""
    sd = reference.state_dict()
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            value.fill_(5004)
    path = tmp_path_factory.mktemp("released") / "mbv2_ca.pth"
    torch.save({"epoch": 200, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    return path


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "ca_flax.convert", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


def test_command_line_converts_and_loads(tmp_path, released, reference):
    """The real entry point: a checkpoint that ca-flax loads and that predicts as PyTorch does."""
    result = _run(str(released), str(tmp_path / "ckpt"))
    assert result.returncode == 0, result.stderr
    assert "official layout" in result.stdout and "stripped the 'module.' prefix" in result.stdout
    model, variables = load_model(tmp_path / "ckpt")
    x = torch.randn(2, 3, 49, 49, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x).numpy()
    logits = jax.jit(model.apply)(variables, x.numpy().transpose(0, 2, 3, 1))
    assert np.max(np.abs(np.asarray(logits) - expected)) < 1e-4 * np.max(np.abs(expected))
    source = read_metadata(tmp_path / "ckpt")["source"]
    assert source["layout"] == "official" and source["num_batches_tracked"] == 5004 and len(source["sha256"]) == 64


def test_command_line_bad_input_exits_2_without_traceback(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    result = _run(str(tmp_path / "notes.pth"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "notes.pth" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_round_trip_through_the_command_line_is_bit_identical(tmp_path, released):
    assert main(["-q", str(released), str(tmp_path / "ckpt")]) == 0
    original = torch.load(released, weights_only=True)["state_dict"]
    for suffix in (".pth", ".safetensors", ".npz"):
        out = tmp_path / f"back{suffix}"
        assert main(["-q", "--to-torch", str(tmp_path / "ckpt"), str(out)]) == 0
        back = load_state_dict(out).arrays
        assert sorted(back) == sorted(k[len("module."):] for k in original)
        for key, value in original.items():
            np.testing.assert_array_equal(back[key[len("module."):]], value.numpy(), err_msg=key)
            assert back[key[len("module."):]].dtype == value.numpy().dtype
        module = tr.OfficialMBV2CA(width_mult=0.5, num_classes=10)
        module.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_num_classes_and_explicit_layout(tmp_path, released, capsys):
    assert main([str(released), str(tmp_path / "ckpt"), "--num-classes", "3", "--layout", "official"]) == 0
    assert "initialized afresh for 3 classes" in capsys.readouterr().out
    model, variables = load_model(tmp_path / "ckpt")
    assert model.num_classes == 3 and variables["params"]["classifier"]["kernel"].shape == (1280, 3)


def test_export_needs_a_layout_for_plain_models(tmp_path, capsys):
    sd = tr.randomize_(tr.timm_mobilenetv2("mobilenetv2_050", num_classes=4), seed=0, calibrate=False).state_dict()
    src = tmp_path / "timm.safetensors"
    from safetensors.torch import save_file

    save_file(dict(sd), str(src))
    assert main(["-q", str(src), str(tmp_path / "ckpt")]) == 0
    # The layout recorded at import is used again...
    assert main(["-q", "--to-torch", str(tmp_path / "ckpt"), str(tmp_path / "a.npz")]) == 0
    assert "conv_stem.weight" in load_state_dict(tmp_path / "a.npz").arrays
    # ...and can be changed: timm weights written in torchvision's layout.
    assert main(["-q", "--to-torch", "--layout", "torchvision", str(tmp_path / "ckpt"), str(tmp_path / "b.npz")]) == 0
    tr.TorchvisionMobileNetV2(width_mult=0.5, num_classes=4).load_state_dict(
        {k: torch.from_numpy(v) for k, v in load_state_dict(tmp_path / "b.npz").arrays.items()}, strict=True
    )
    # Without a recorded layout a plain model needs --layout.
    meta = tmp_path / "ckpt" / "model.json"
    meta.write_text(meta.read_text().replace('"layout": "timm"', '"layout": null'))
    assert main(["--to-torch", str(tmp_path / "ckpt"), str(tmp_path / "c.npz")]) == 2
    assert "pass --layout torchvision or timm" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}", "{dst}"], "no such file"),
        (["{tmp}", "{dst}"], "is a directory, not a checkpoint file"),
        (["{released}", "{existing}"], "already exists; pass --overwrite"),
        (["--to-torch", "{released}", "{tmp}/x.pth"], "is a file, not a ca-flax checkpoint directory"),
        (["--to-torch", "{tmp}", "{tmp}/x.pth"], "not a ca-flax model checkpoint"),
        (["--to-torch", "{tmp}", "{tmp}/x.onnx"], "unknown output type '.onnx'"),
        (["{released}", "{dst}", "--num-classes", "-3"], "num_classes must be a non-negative integer"),
    ],
    ids=["missing", "directory", "dst-exists", "export-from-file", "export-from-other-dir", "export-suffix", "num-classes"],
)
def test_bad_input_exit_2(tmp_path, released, capsys, args, message):
    (tmp_path / "existing").mkdir()
    names = {"missing": tmp_path / "nope.pth", "dst": tmp_path / "out", "tmp": tmp_path, "released": released,
             "existing": tmp_path / "existing"}
    assert main([a.format(**{k: str(v) for k, v in names.items()}) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.pth").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_overwrite_replaces_the_destination(tmp_path, released):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "stale").write_text("old")
    assert main(["-q", "--overwrite", str(released), str(tmp_path / "ckpt")]) == 0
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.json", "variables"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("case", ["same path", "dot path", "symlink", "hard link", "parent directory"])
def test_destination_that_is_or_holds_the_source_is_refused(tmp_path, released, case):
    """``--overwrite`` replaces DST as a whole: a DST that is SRC (by any path) or holds it
    would destroy the input, so it is refused before anything is read or written."""
    work = tmp_path / "work"
    work.mkdir()
    src = work / "x.pth"
    src.write_bytes(released.read_bytes())
    dst = {"same path": str(src), "dot path": "./x.pth", "symlink": "link.pth", "hard link": "hard.pth",
           "parent directory": str(work)}[case]
    if case == "symlink":
        (work / dst).symlink_to(src)
    elif case == "hard link":
        os.link(src, work / dst)
    before = sorted(p.name for p in work.iterdir())
    result = _run(str(src), dst, "--overwrite", cwd=work)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "SRC" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in work.iterdir()) == before and src.read_bytes() == released.read_bytes()
