"""The side-by-side benchmark's bookkeeping (no timing is asserted anywhere)."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_pytorch.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_pytorch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(**overrides) -> argparse.Namespace:
    defaults = dict(device="cpu", only="", torch_compile_train=False)
    return argparse.Namespace(**{**defaults, **overrides})


def test_ratio_table_compares_with_the_best_pytorch_and_lists_failures(compare):
    results = {
        "torch_infer_channels_last": {"images_per_sec": 50.0, "compile_s": None, "peak_rss_mib": 700},
        "torch_infer_compile": {"images_per_sec": 100.0, "compile_s": 5.0, "peak_rss_mib": 700},
        "torch_train_channels_last": {"images_per_sec": 10.0, "compile_s": None, "peak_rss_mib": 3000,
                                      "peak_device_mib": 1200.0},
        "flax_infer_jit": {"images_per_sec": 95.0, "compile_s": 2.0, "peak_rss_mib": 800, "peak_device_mib": 4000.0,
                           "executable_device_mib": 1300.0},
        "flax_infer": {"images_per_sec": 150.0, "compile_s": 2.0, "peak_rss_mib": 800},
        "flax_train_step": {"error": "flax_train_step failed (exit 1):\nboom"},
        "torch_infer_compile_microbatch": {"images_per_sec": 120.0, "compile_s": 5.0, "peak_rss_mib": 500},
    }
    table = compare._ratio_table(results, madds=300_000_000, peak_tflops=1.0)
    assert "device MiB" in table[0] and "of peak" in table[0]
    flax_row = next(row for row in table if row.startswith("flax_infer "))
    assert "1.50x torch_infer_compile" in flax_row
    assert "9.00%" in flax_row  # 2 * 3e8 * 150 / 1e12
    # The micro-batched torch.compile is not a reference configuration: its own line.
    assert "flax_infer against torch_infer_compile_microbatch: 1.25x" in table
    assert any(row.startswith("flax_infer_jit: its executable needs 1300 of the 4000 device MiB") for row in table)
    train_row = next(row for row in table if row.startswith("torch_train_channels_last"))
    assert "1200" in train_row and "1.80%" in train_row  # x3 for a training step
    assert any(row.startswith("flax_train_step") and "failed: flax_train_step failed (exit 1)" in row for row in table)


def test_measurements_follow_only_and_reject_bad_orders(compare):
    parser = argparse.ArgumentParser()
    assert compare._measurements(_args(only="flax_infer,torch_infer_nchw"), parser) == ["flax_infer", "torch_infer_nchw"]
    gpu = compare._measurements(_args(device="gpu"), parser)
    assert "flax_trainer" not in gpu and gpu[-3:] == ["flax_infer", "flax_infer_jit", "flax_train_step"]
    assert compare.MICROBATCH not in gpu and compare.MICROBATCH in compare._measurements(_args(), parser)
    for only in ("flax_trainer_cached", "flax_trainer_cached,flax_trainer", "bogus"):
        with pytest.raises(SystemExit):
            compare._measurements(_args(only=only), parser)
    with pytest.raises(SystemExit):  # the trainer does not run on the GPU path
        compare._measurements(_args(device="gpu", only="flax_trainer"), parser)


def test_a_measurement_past_its_timeout_is_killed_and_reported(compare):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    status, peak_mib, timed_out = compare._wait_with_peak(proc, timeout=0.5)
    assert timed_out and status != 0 and peak_mib > 0
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    status, _, timed_out = compare._wait_with_peak(quick, timeout=30)
    assert (status, timed_out) == (0, False)


def test_repeats_report_the_median_run_and_keep_every_rate(compare):
    runs = [{"images_per_sec": 30.0, "compile_s": 3.0, "peak_rss_mib": 900},
            {"error": "torch_infer_nchw failed (exit 1):\nboom"},
            {"images_per_sec": 10.0, "compile_s": 1.0, "peak_rss_mib": 700},
            {"images_per_sec": 20.0, "compile_s": 2.0, "peak_rss_mib": 800}]
    median = compare.median_result(runs)
    assert median["images_per_sec"] == 20.0 and median["compile_s"] == 2.0  # the whole median run
    assert median["runs_images_per_sec"] == [30.0, 10.0, 20.0] and median["failed_runs"] == 1
    assert compare._spread(median) == "100%"  # (30 - 10) / 20
    assert compare.median_result(runs[1:2]) == runs[1]  # every run failed: the error
    assert compare._spread(runs[0]) == "-"
    table = compare._ratio_table({"torch_infer_nchw": median, "flax_infer_jit": runs[0]})
    assert "1.50x torch_infer_nchw" in next(row for row in table if row.startswith("flax_infer_jit"))


def test_every_model_has_a_pytorch_counterpart(compare):
    sys.path.insert(0, str(SCRIPT.parent.parent / "tests"))
    import torch_reference  # noqa: F401  (needs torch; the suite installs it)

    from ca_flax.models import registry

    for name, (cls, _) in compare.MODELS.items():
        assert name in registry.list_models() and hasattr(torch_reference, cls)
