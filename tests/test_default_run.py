"""The main job as a newcomer runs it: ``python train.py`` with the default config learns.

A real end-to-end run in a subprocess (digits, MobileNetV2+CA, the full default
schedule), on the native-kernel path and on the XLA-only path, each at a seed other
than 0, and switched to MobileNeXt+CA with one flag: the user gets a model that learns,
not only code that runs. All seeds of both
paths, with timings, are benchmarks/default_run.py's job (docs/training.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _final_eval(workdir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval_top1" in r][-1]


@pytest.mark.slow
@pytest.mark.parametrize("flags, seed, native", [
    ((), 1, True),
    ((), 2, False),
    (("--config.model=mobilenext_ca",), 3, True),
], ids=["native-seed1", "xla-seed2", "mobilenext_ca-native-seed3"])
def test_default_config_learns_end_to_end(tmp_path, flags, seed, native):
    env = {**os.environ, "CA_FLAX_NATIVE": "1" if native else "0"}
    proc = subprocess.run(
        [sys.executable, "train.py", f"--workdir={tmp_path}", f"--config.seed={seed}", *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    final = _final_eval(tmp_path)
    assert final["step"] == 550  # the whole default schedule ran
    assert final["eval_top1"] >= 0.95, final
    assert "Done: 550 steps" in proc.stdout
    model = flags[0].split("=")[1] if flags else "mobilenetv2_ca"
    assert proc.stdout.startswith(f"Training {model} ") or f"\nTraining {model} " in proc.stdout
