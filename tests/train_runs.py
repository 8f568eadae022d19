"""The tiny train.py run the trainer's end-to-end tests share: its flags, how to run it
as a user would, and how two runs are compared.

Imported by tests/test_training.py, tests/test_training_parallel.py and
tests/test_workdir_faults.py. The ``cache`` and ``baseline`` fixtures are in
tests/conftest.py: each of those files has one persistent compilation cache, and all
three compare with one uninterrupted baseline run per session, whose compiled programs
seed each file's cache (so only a run that differs from it compiles).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]

# A tiny run: 8 steps of batch 16 on digits at 64x64, in float64. A tiny network at a
# tiny batch is chaotic: float32 rounding differences between 1 and 8 devices grow to
# percents within a few steps, and at 32x32 (1x1 maps in the last stages) even float64's
# do. At 64x64 in float64 the losses of 1 and 8 devices were equal to all printed digits
# for 9 steps, then 1e-8, 1e-7, 1e-4 apart at steps 10, 11, 12: so 8 steps. One block per
# stage: each subprocess compiles the network, and depth is what compiling costs.
X64 = {"JAX_ENABLE_X64": "1"}
TINY = [
    "--config.dtype=float64", "--config.param_dtype=float64",
    "--config.model_kwargs.width_mult=0.25", "--config.model_kwargs.stage_repeats=1,1,1,1,1,1,1",
    "--config.image_size=64", "--config.batch_size=16", "--config.eval_batch_size=64",
    "--config.num_train_steps=8", "--config.log_every_steps=2", "--config.eval_every_steps=4",
    "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=2", "--config.learning_rate=0.1",
]


def run_train(workdir: Path, *flags: str, cache: Path, env: dict | None = None, check: bool = True,
              timeout: int = 400) -> subprocess.CompletedProcess:
    """Runs ``python train.py`` as a user would."""
    cmd = [sys.executable, str(REPO / "train.py"), f"--workdir={workdir}", f"--compilation_cache_dir={cache}",
           *TINY, *flags]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **X64, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def final_variables(workdir: Path) -> dict:
    from ca_flax.checkpoints import restore

    _, variables, step = restore(workdir)
    assert step == 8
    return variables


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(expected: Path, actual: Path) -> None:
    """Same losses and evaluation to float64 rounding, same parameters to float tolerance.

    Measured: the losses agree to 2e-8 (relative) through step 8. Parameters are 1e-7
    apart with 8 devices and up to 4e-4 with 2 processes: the reduction order differs and
    a few weights of this tiny net are very sensitive, though the loss barely sees them.
    A per-device BatchNorm or a wrong data shard moves the losses by 1e-2 or more.
    """
    metrics = lambda wd, key: [m[key] for m in read_metrics(wd) if key in m]  # noqa: E731
    for key in ("train_loss", "train_top1", "eval_loss", "eval_top1"):
        np.testing.assert_allclose(metrics(expected, key), metrics(actual, key), rtol=1e-6, err_msg=key)
    for a, b in zip(jax.tree_util.tree_leaves(final_variables(expected)), jax.tree_util.tree_leaves(final_variables(actual))):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=2e-3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``error: ...`` line of a refused train.py."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]
