"""Export to LiteRT and ONNX: the command end to end, parity for every attention block at
even and odd sizes, int8 calibrated on digits, bad input, and no custom call left."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

for _module in ("ai_edge_litert", "onnxruntime", "tf2onnx"):
    pytest.importorskip(_module, reason="the export extra: pip install -e '.[export]'")

from conftest import numpy_variables  # noqa: E402

from ca_flax import native  # noqa: E402
from ca_flax.checkpoints import save_model  # noqa: E402
from ca_flax.data.config import MEAN_RGB, STDDEV_RGB  # noqa: E402
from ca_flax.export import (  # noqa: E402
    ExportError, checkpoint_sha256, custom_calls, export_onnx, export_tflite, fold_batch_norm, sidecar_path,
    stablehlo_text,
)
from ca_flax.export import api  # noqa: E402
from ca_flax.export.__main__ import main  # noqa: E402
from ca_flax.export.api import checkpoint_files, reference_function  # noqa: E402
from ca_flax.export.dataset import heldout_batches  # noqa: E402
from ca_flax.export.litert import tflite_ops, tflite_runner  # noqa: E402
from ca_flax.export.onnx_file import onnx_ops, onnx_runner  # noqa: E402
from ca_flax.models import create_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = dict(num_classes=10, width_mult=0.35, stage_repeats=(1,) * 7)
RUNNERS = {".tflite": tflite_runner, ".onnx": onnx_runner}
# Standard ONNX ops only (no custom domain); LiteRT builtins only (no CUSTOM / Flex op).
FOREIGN_TFLITE_OPS = {"CUSTOM", "DELEGATE"}


def _tiny(attention: str | None = "ca", size: int = 32):
    model = create_model("mobilenetv2", attention=attention, **TINY)
    return model, numpy_variables(model, (1, size, size, 3))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny MobileNetV2+CA model checkpoint, recorded as trained on digits at 32x32."""
    model, variables = _tiny("ca")
    path = tmp_path_factory.mktemp("export") / "ckpt"
    save_model(path, model, variables, source={"trained_by": "test", "dataset": "digits", "image_size": 32})
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "ca_flax.export", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _check_sidecar(output: Path, checkpoint: Path) -> dict:
    sidecar = json.loads(sidecar_path(output).read_text())
    assert sidecar["input"]["shape"] == [1, 32, 32, 3] and sidecar["input"]["layout"] == "NHWC"
    assert sidecar["input"]["normalization"]["mean"] == list(MEAN_RGB)
    assert sidecar["input"]["normalization"]["std"] == list(STDDEV_RGB)
    assert sidecar["output"]["shape"] == [1, 10] and sidecar["num_classes"] == 10
    assert sidecar["labels"] == [str(i) for i in range(10)]  # digits, recorded by the checkpoint
    assert sidecar["source"]["sha256"] == checkpoint_sha256(checkpoint) and sidecar["source"]["step"] == 0
    assert sidecar["file_sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
    assert sidecar["preprocessing"]["center_crop_fraction"] == 1.0  # digits: the whole image
    return sidecar


def test_command_exports_a_checkpoint_to_tflite_verified(tmp_path, checkpoint, capsys):
    """Exit 0, the figure printed, the sidecar (in this process: a process of its own
    costs TensorFlow's import again; the bad-input test below runs the real entry point)."""
    output = tmp_path / "model.tflite"
    assert main([str(checkpoint), str(output)]) == 0
    assert "verified in ai_edge_litert: float32 logits within" in capsys.readouterr().out
    report = _check_sidecar(output, checkpoint)["verification"]
    assert report["passed"] and report["relative_error"] <= 1e-4 and report["inputs"] == 3
    assert not set(tflite_ops(output)) & FOREIGN_TFLITE_OPS
    assert _leftovers(tmp_path) == []


def test_command_exports_a_checkpoint_to_onnx_verified(tmp_path, checkpoint, capsys):
    output = tmp_path / "model.onnx"
    assert main([str(checkpoint), str(output)]) == 0
    assert "verified in onnxruntime: float32 logits within" in capsys.readouterr().out
    sidecar = _check_sidecar(output, checkpoint)
    assert sidecar["verification"]["relative_error"] <= 1e-4
    assert (sidecar["input"]["name"], sidecar["output"]["name"]) == ("images", "logits")
    assert "Conv" in onnx_ops(output)
    assert _leftovers(tmp_path) == []


def test_command_exports_a_training_workdir_at_its_recorded_size(tmp_path, capsys):
    """A workdir as train.py leaves it (model.json + orbax checkpoints/<step>/{state,meta},
    written here with orbax directly): its step, its image size, its files' sha256."""
    import orbax.checkpoint as ocp

    from ca_flax.checkpoints import model_config

    model, variables = _tiny("se", 33)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "model.json").write_text(json.dumps({
        "format": "ca-flax-model", "version": 1, "architecture": "MobileNetV2", "config": model_config(model),
        "source": {"trained_by": "ca_flax train.py", "dataset": "digits", "image_size": 33}}))
    state = {"step": np.int32(7), **variables, "opt_state": {}, "rng": np.zeros(2, np.uint32)}
    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "meta")) as manager:
        manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({})))
        manager.wait_until_finished()
    output = tmp_path / "model.tflite"
    assert main([str(workdir), str(output)]) == 0
    sidecar = json.loads(sidecar_path(output).read_text())
    assert sidecar["input"]["shape"] == [1, 33, 33, 3] and sidecar["verification"]["passed"]
    assert (sidecar["source"]["kind"], sidecar["source"]["step"]) == ("training workdir", 7)
    assert sidecar["source"]["sha256"] == checkpoint_sha256(workdir, 7)
    assert checkpoint_files(workdir, 7)[0].startswith("checkpoints/7/") and "model.json" in checkpoint_files(workdir, 7)
    assert "verified in" in capsys.readouterr().out


@pytest.mark.parametrize(
    "attention, size, suffix",
    [("ca", 33, ".tflite"), ("se", 32, ".onnx"), ("cbam", 32, ".tflite"), (None, 33, ".onnx")],
)
def test_every_attention_block_exports_with_parity(tmp_path, attention, size, suffix):
    """Each block at an even or an odd size, half to each format: the exporter's own
    check, and the file run here against model.apply on an input of its own."""
    model, variables = _tiny(attention, size)
    output = tmp_path / f"model{suffix}"
    exporter = export_tflite if suffix == ".tflite" else export_onnx
    sidecar = exporter(model, variables, output, image_size=size)
    assert sidecar["verification"]["passed"] and sidecar["input"]["shape"] == [1, size, size, 3]
    x = np.random.default_rng(7).standard_normal((1, size, size, 3)).astype(np.float32)
    want = reference_function(model, variables)(x)
    got = RUNNERS[suffix](output)(x)
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


@pytest.mark.parametrize("suffix", [".tflite", ".onnx"])
def test_int8_calibrated_on_digits_reports_agreement_with_the_float_model(tmp_path, checkpoint, capsys, suffix):
    output = tmp_path / f"int8{suffix}"
    args = [str(checkpoint), str(output), "--quantize", "int8", "--calibration", "digits", "--calibration-steps", "8",
            "--eval-examples", "40"]
    assert main(args) == 0
    assert "int8 top-1 agrees with the float model" in capsys.readouterr().out
    sidecar = json.loads(sidecar_path(output).read_text())
    assert sidecar["quantization"] == "int8" and sidecar["calibration"] == {"dataset": "digits", "split": "train",
                                                                            "images": 8}
    report = sidecar["verification"]
    assert report["examples"] == 40
    assert set(report) >= {"top1_agreement", "float_top1", "int8_top1", "median_relative_logit_error",
                           "max_relative_logit_error"}
    # The agreement is the int8 file's top-1 against model.apply's on the held-out images.
    model, variables = _tiny("ca")
    run, reference = RUNNERS[suffix](output), reference_function(model, variables)
    agree = correct = 0
    for images, labels, mask in heldout_batches("digits", None, 32, 1, limit=40):
        agree += int(np.sum((run(images).argmax(-1) == reference(images).argmax(-1))[mask]))
        correct += int(np.sum((reference(images).argmax(-1) == labels)[mask]))
    assert report["top1_agreement"] == agree / 40 and report["float_top1"] == correct / 40
    if suffix == ".tflite":
        assert not set(tflite_ops(output)) & FOREIGN_TFLITE_OPS


def _expect_exit_2(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


@pytest.mark.parametrize(
    "case, expected",
    [("extension", "unknown extension '.pb'"), ("missing", "no such checkpoint"), ("small", "image size 16"),
     ("no-calibration", "needs --calibration"), ("no-directory", "does not exist"),
     ("folder-without-data-dir", "needs data_dir")],
)
def test_bad_input_exits_2_with_one_paragraph_and_writes_nothing(tmp_path, checkpoint, capsys, case, expected):
    out = tmp_path / "model.tflite"
    args = {
        "extension": [str(checkpoint), str(tmp_path / "model.pb")],
        "missing": [str(tmp_path / "nothing"), str(out)],
        "small": [str(checkpoint), str(out), "--image-size", "16"],
        "no-calibration": [str(checkpoint), str(out), "--quantize", "int8"],
        "no-directory": [str(checkpoint), str(tmp_path / "absent" / "model.onnx")],
        "folder-without-data-dir": [str(checkpoint), str(out), "--quantize", "int8", "--calibration", "folder"],
    }[case]
    assert expected in _expect_exit_2(capsys, args)
    assert list(tmp_path.iterdir()) == []


def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    result = _cli(str(tmp_path / "nothing"), str(tmp_path / "model.onnx"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "no such checkpoint" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_leaves_the_previous_output_and_no_partial_file(tmp_path, checkpoint, capsys,
                                                                                monkeypatch):
    output = tmp_path / "model.tflite"
    output.write_bytes(b"previous export")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(api, "_sidecar", full_disk)  # after the file is written, before the rename
    assert "No space left on device" in _expect_exit_2(capsys, [str(checkpoint), str(output)])
    assert output.read_bytes() == b"previous export" and not sidecar_path(output).exists()
    assert _leftovers(tmp_path) == []


def test_a_file_that_fails_verification_is_not_written(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(api, "TOLERANCE", 0.0)  # no float32 file matches exactly
    output = tmp_path / "model.onnx"
    assert main([str(checkpoint), str(output)]) == 1
    assert "differ from model.apply" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_exported_graph_has_no_custom_call():
    """The exporters lower the plain modules; the model's own eval pass has the native
    kernels' custom calls where they are built, which is what the switch removes."""
    model, variables = _tiny("ca")
    assert custom_calls(stablehlo_text(model, variables, (1, 32, 32, 3))) == []
    if native.depthwise_inference_target() is not None:
        import jax

        lowered = jax.jit(lambda x: model.apply(variables, x)).lower(np.zeros((1, 32, 32, 3), np.float32))
        assert any("ca_flax" in call for call in custom_calls(lowered.as_text()))


def test_batch_norm_folds_into_the_convolutions_without_changing_the_model():
    model, variables = _tiny("ca")
    folded = fold_batch_norm(model, variables, (1, 32, 32, 3))
    stem = folded["batch_stats"]["stem"]["bn"]
    assert not stem["mean"].any() and np.all(np.float32(stem["var"] + np.float32(1e-5)) == 1)
    attention = folded["batch_stats"]["blocks_1"]["attention"]["bn"]  # CA's reduce conv + BN
    assert not attention["mean"].any()
    x = np.random.default_rng(3).standard_normal((2, 32, 32, 3)).astype(np.float32)
    want = reference_function(model, variables)(x)
    assert np.max(np.abs(reference_function(model, folded)(x) - want)) <= 1e-5 * np.max(np.abs(want))


def test_checkpoint_sha256_is_sha256sum_of_the_sorted_files(tmp_path):
    for name in ("model.json", "checkpoints/7/state/a", "checkpoints/7/meta/b", "checkpoints/3/state/old",
                 "metrics.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    files = checkpoint_files(tmp_path, 7)
    assert files == ["checkpoints/7/meta/b", "checkpoints/7/state/a", "model.json"]
    lines = "".join(f"{hashlib.sha256(name.encode()).hexdigest()}  {name}\n" for name in files)
    assert checkpoint_sha256(tmp_path, 7) == hashlib.sha256(lines.encode()).hexdigest()


def test_python_api_refuses_a_wrong_extension_before_converting(tmp_path):
    model, variables = _tiny("ca")
    with pytest.raises(ExportError, match=r"\.onnx"):
        export_onnx(model, variables, tmp_path / "model.tflite", image_size=32)
    assert list(tmp_path.iterdir()) == []
