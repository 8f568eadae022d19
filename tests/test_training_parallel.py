"""train.py on 8 simulated devices and in 2 processes (jax.distributed on localhost,
gloo) against the same run on one device: the same losses, evaluation and parameters.
Its own file so that pytest-xdist can run it beside the rest of the trainer's tests."""

from __future__ import annotations

import os
import subprocess
import sys

from train_runs import REPO, TINY, X64, assert_same_run, free_port, read_metrics, run_train


def test_eight_devices_match_one_device(baseline, cache, tmp_path):
    workdir = tmp_path / "wd"
    run_train(workdir, cache=cache, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert_same_run(baseline, workdir)


def test_two_processes_match_one_process(baseline, cache, tmp_path):
    workdir = tmp_path / "wd"
    address = f"localhost:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), f"--workdir={workdir}", f"--compilation_cache_dir={cache}", *TINY,
             f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **X64},
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    assert "in 2 process(es)" in outputs[0]
    assert_same_run(baseline, workdir)
    # Process 0 alone writes the workdir's files; process 1 only its share of each checkpoint.
    assert sorted(p.name for p in workdir.iterdir()) == [".lock", "checkpoints", "curves.png", "metrics.jsonl",
                                                         "model.json", "tensorboard"]
    assert len(list((workdir / "tensorboard").iterdir())) == 1
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == len(read_metrics(baseline))
