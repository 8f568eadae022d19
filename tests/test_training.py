"""The trainer: optimizer and steps in-process; train.py end to end in subprocesses
(resume after SIGKILL, SIGTERM, Ctrl-C, NaN, 8 devices, 2 processes, evaluation) and the
workdir under faults (another model or optimizer, a held workdir, an unreadable
checkpoint, a finished run; docs/workdir.md).

The end-to-end runs share one tiny configuration and one persistent compilation cache,
so only the first run pays for compiling.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ca_flax.training import optim, parallel
from ca_flax.training.steps import cross_entropy, eval_step, top_k_correct

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


# -- in-process units -------------------------------------------------------------------


def _config(**overrides) -> ml_collections.ConfigDict:
    from configs import default

    config = default.get_config()
    config.update(overrides)
    return config


def test_learning_rate_is_scaled_warmed_up_and_cosine_decayed():
    config = _config(learning_rate=0.05, batch_size=512, warmup_epochs=1.0)
    assert optim.scaled_learning_rate(config) == pytest.approx(0.1)
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, total_steps=100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(0.1)
    assert float(schedule(55)) == pytest.approx(0.05, rel=1e-3)  # half way through the cosine
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)


def test_weight_decay_is_coupled_l2_on_every_parameter_by_default():
    params = {"conv": {"kernel": jnp.ones((2,))}, "bn": {"scale": jnp.ones((2,))}}
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    for exclude, bn_decayed in ((False, True), (True, False)):
        config = _config(weight_decay=0.1, momentum=0.0, weight_decay_exclude_norm_and_bias=exclude)
        tx = optim.create_optimizer(config, optax.constant_schedule(1.0))
        updates, _ = tx.update(zero_grads, tx.init(params), params)
        np.testing.assert_allclose(updates["conv"]["kernel"], -0.1)
        assert bool(jnp.any(updates["bn"]["scale"] != 0)) == bn_decayed
    with pytest.raises(ValueError, match="Unknown optimizer 'adam'"):
        optim.create_optimizer(_config(optimizer="adam"), optax.constant_schedule(1.0))


def test_grad_clip_norm_rescales_large_gradients_and_keeps_the_optimizer_state_tree():
    params = {"conv": {"kernel": jnp.zeros((4,))}}
    grads = {"conv": {"kernel": jnp.array([3.0, 4.0, 0.0, 0.0])}}  # global norm 5
    plain = optim.create_optimizer(_config(weight_decay=0.0, momentum=0.0), optax.constant_schedule(1.0))
    for clip, expected in ((0.0, [-3.0, -4.0]), (10.0, [-3.0, -4.0]), (1.0, [-0.6, -0.8])):
        tx = optim.create_optimizer(_config(weight_decay=0.0, momentum=0.0, grad_clip_norm=clip),
                                    optax.constant_schedule(1.0))
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(updates["conv"]["kernel"][:2], expected, rtol=1e-6)
        # Turning clipping on or off does not change what a checkpoint holds.
        assert jax.tree_util.tree_structure(tx.init(params)) == jax.tree_util.tree_structure(plain.init(params))
    with pytest.raises(ValueError, match="grad_clip_norm must be >= 0"):
        optim.create_optimizer(_config(grad_clip_norm=-1.0), optax.constant_schedule(1.0))


def test_cross_entropy_label_smoothing_and_top_k():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    labels = jnp.array([0, 2])
    plain = cross_entropy(logits, labels, 3, 0.0)
    np.testing.assert_allclose(plain, -jax.nn.log_softmax(logits)[jnp.arange(2), labels], rtol=1e-6)
    smooth = cross_entropy(logits, labels, 3, 0.3)
    target = jnp.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(smooth, -(target * jax.nn.log_softmax(logits)).sum(-1), rtol=1e-6)
    np.testing.assert_array_equal(top_k_correct(logits, labels, 1), [1.0, 0.0])
    np.testing.assert_array_equal(top_k_correct(logits, labels, 2), [1.0, 1.0])


def test_eval_step_counts_only_unmasked_examples():
    class Fixed:
        """A stand-in state whose model returns fixed logits."""

        def __init__(self, logits):
            self.logits = logits

        def apply_fn(self, variables, images, train):
            return self.logits

        def variables(self):
            return {}

    logits = jnp.array([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    batch = {"image": jnp.zeros((3, 1)), "label": jnp.array([0, 0, 1]), "mask": jnp.array([True, True, False])}
    sums = eval_step(Fixed(logits), batch, num_classes=2)
    assert float(sums["count"]) == 2 and float(sums["top1_sum"]) == 1 and float(sums["top5_sum"]) == 2
    # A predict function (the trainer passes ca_flax.inference.predict_fn) replaces apply_fn.
    doubled = eval_step(Fixed(logits), batch, num_classes=2, predict=lambda variables, images: 2 * logits)
    assert float(doubled["count"]) == 2 and float(doubled["top1_sum"]) == 1
    assert float(doubled["loss_sum"]) != float(sums["loss_sum"])


def test_steps_per_call_divides_every_cadence_the_step_count_and_the_resumed_step():
    from ca_flax.training.trainer import steps_per_call

    config = _config(log_every_steps=8, eval_every_steps=16, checkpoint_every_steps=8)
    assert steps_per_call(config, 64, backend="cpu") == 8
    assert steps_per_call(config, 60, backend="cpu") == 4  # 60 steps in all
    assert steps_per_call(config, 64, start_step=6, backend="cpu") == 2  # resumed from step 6
    assert steps_per_call(config, 64, backend="gpu") == 1 and steps_per_call(config, 64, backend="tpu") == 1
    config.steps_per_call = 4
    assert steps_per_call(config, 64, backend="gpu") == 4  # an explicit count holds on any backend
    config.steps_per_call = 16
    with pytest.raises(ValueError, match=r"must divide log_every_steps \(8\), checkpoint_every_steps \(8\);"):
        steps_per_call(config, 64, backend="cpu")


def test_batch_divisibility_and_distributed_flag_errors(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the 8 devices.*multiple of 8"):
        parallel.check_batch_divisible(12)
    parallel.check_batch_divisible(16)
    with pytest.raises(ValueError, match="needs all of --coordinator_address, --num_processes and --process_id"):
        parallel.initialize_distributed("localhost:1234", None, None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model="resnet50"), "Unknown model 'resnet50'"),
        (dict(dataset="no_such_dataset_xyz"), "no_such_dataset_xyz"),
        (dict(dataset="folder", data_dir=None), "data_dir"),
        (dict(dtype="float16"), "dtype must be one of"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(num_epochs=0, num_train_steps=-1), "Nothing to train"),
        (dict(batch_size=4096), "larger than the 1437 training examples"),
        (dict(init_from="/no/such/checkpoint"), "no such checkpoint"),
        (dict(steps_per_call=3), r"steps_per_call=3 must divide log_every_steps \(50\), eval_every_steps \(200\)"),
        (dict(steps_per_call=-1), "steps_per_call must be 0 \\(automatic\\) or positive"),
        (dict(model_kwargs={"widht_mult": 0.5}), r"config.model_kwargs.widht_mult: mobilenetv2_ca has no option "
                                                 r"'widht_mult' \(did you mean width_mult\?\)"),
        (dict(width_mult=0.5), r"config.width_mult was moved: write config.model_kwargs.width_mult = 0.5 "
                               r"\(command line: --config.model_kwargs.width_mult=0.5\)"),
    ],
)
def test_invalid_configs_fail_before_compiling(overrides, message, tmp_path, monkeypatch):
    from ca_flax.training import trainer

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before validating the config")

    monkeypatch.setattr(trainer, "initial_variables", no_compile)
    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(_config(**overrides), tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("field, value, allowed", [
    ("eval_batch_size", 0, "a positive integer"),  # trained, then crashed at the first evaluation
    ("learning_rate", -0.1, "a number > 0"),  # trained by gradient ascent
    ("learning_rate", math.inf, "a number > 0"),
    ("momentum", 1.0, r"a number in \[0, 1\)"),
    ("weight_decay", -1e-4, "a number >= 0"),
    ("warmup_epochs", -1.0, "a number >= 0"),
    ("label_smoothing", 1.0, r"a number in \[0, 1\)"),
    ("keep_checkpoints", 0, "a positive integer"),
    ("num_epochs", -1, "a number >= 0"),
    ("num_train_steps", 2.5, r"an integer \(> 0 overrides num_epochs\)"),
    ("batch_size", True, "a positive integer"),
    ("image_size", 0, "a positive integer"),
    ("log_every_steps", 0, "a positive integer"),
    ("steps_per_call", -1, r"0 \(automatic\) or positive"),
    ("seed", 1.5, r"an integer in \[-2\*\*63, 2\*\*63\)"),
    ("nesterov", "yes", "True or False"),
    ("async_checkpoints", 1, "True or False"),
    ("dataset", "", "a dataset name"),
    ("init_from", 3, "a checkpoint directory, or '' for none"),
    ("grad_clip_norm", -1.0, r"a number >= 0 \(0: no clipping\)"),  # optional: when the config has it
])
def test_validate_config_names_the_field_the_value_and_what_is_allowed(field, value, allowed):
    from ca_flax.training.trainer import validate_config

    # A fresh ConfigDict: assigning a value of another type to a field raises in ml_collections.
    config = ml_collections.ConfigDict({**_config().to_dict(), field: value})
    with pytest.raises(ValueError, match=rf"^{field} must be {allowed}, got {re.escape(repr(value))}\.$"):
        validate_config(config)


# -- train.py end to end ---------------------------------------------------------------


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


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache) -> Path:
    """One uninterrupted run every other run is compared with."""
    workdir = tmp_path_factory.mktemp("baseline") / "wd"
    result = run_train(workdir, cache=cache)
    assert "Done: 8 steps" in result.stdout
    return workdir


def test_run_writes_metrics_checkpoints_and_events(baseline):
    lines = read_metrics(baseline)
    train = [m for m in lines if "train_loss" in m]
    evals = [m for m in lines if "eval_top1" in m]
    assert [m["step"] for m in train] == [2, 4, 6, 8]
    assert all({"train_loss", "learning_rate"} <= set(m) for m in train)
    assert all("images_per_sec" in m and m["images_per_sec"] > 0 for m in train[1:])
    assert [m["step"] for m in evals] == [4, 8]
    compiles = [m for m in lines if "train_step_compile_s" in m]
    assert [m["step"] for m in compiles] == [0] and compiles[0]["train_step_compile_s"] > 0
    assert all(0.0 <= m["eval_top1"] <= m["eval_top5"] <= 1.0 and m["eval_loss"] > 0 for m in evals)
    assert list((baseline / "tensorboard").glob("events.out.tfevents.*"))
    kept = sorted(int(p.name) for p in (baseline / "checkpoints").iterdir() if p.name.isdigit())
    assert 8 in kept and 6 in kept and len(kept) <= 3  # last 2, plus the best evaluated
    assert json.loads((baseline / "model.json").read_text())["config"]["width_mult"] == 0.25


def test_run_draws_curves_and_logs_attention_images(baseline):
    """ca_flax/viz/training.py: WORKDIR/curves.png at the end, the attention maps of the
    first evaluation image in TensorBoard at each evaluation (steps 4 and 8)."""
    import tensorflow as tf

    assert (baseline / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(baseline.glob(".curves.png.tmp-*"))
    steps = []
    for path in (baseline / "tensorboard").glob("events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == "attention":
                    steps.append(event.step)
                    width, height, png = tf.make_ndarray(value.tensor)
                    assert int(width) > 100 and int(height) > 100 and png[:4] == b"\x89PNG"
    assert sorted(steps) == [4, 8]


def test_several_steps_per_call_train_exactly_as_one_step_per_call(baseline, cache, tmp_path):
    # The baseline ran 2 steps per call (TINY's cadences allow 2 on CPU); 4 per call here.
    workdir = tmp_path / "wd"
    result = run_train(workdir, "--config.steps_per_call=4", "--config.log_every_steps=4",
                       "--config.checkpoint_every_steps=4", cache=cache)
    assert "4 per compiled call" in result.stdout
    for a, b in zip(jax.tree_util.tree_leaves(final_variables(baseline)), jax.tree_util.tree_leaves(final_variables(workdir))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert [m["step"] for m in read_metrics(workdir) if "train_loss" in m] == [4, 8]


def test_evaluate_cli_on_the_workdir(baseline):
    result = subprocess.run(
        [sys.executable, "-m", "ca_flax.evaluate", "--checkpoint", str(baseline), "--batch_size", "64"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **X64},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    final_eval = [m for m in read_metrics(baseline) if "eval_top1" in m][-1]
    assert metrics["eval_examples"] == 360 and metrics["step"] == 8
    assert metrics["eval_top1"] == pytest.approx(final_eval["eval_top1"], abs=0.01)  # float32 here, float64 there
    bad = subprocess.run([sys.executable, "-m", "ca_flax.evaluate", "--checkpoint", str(baseline / "nope")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no such checkpoint" in bad.stderr


def test_sigkill_at_any_moment_then_rerun_is_bit_identical(baseline, cache, tmp_path):
    workdir = tmp_path / "wd"
    cmd = [sys.executable, str(REPO / "train.py"), f"--workdir={workdir}", f"--compilation_cache_dir={cache}", *TINY,
           "--config.checkpoint_every_steps=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **X64})
    deadline = time.time() + 300
    # Kill once a few checkpoints exist: likely in the middle of writing the next one.
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()] if workdir.exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = run_train(workdir, "--config.checkpoint_every_steps=1", cache=cache)
    assert "Resumed from" in result.stdout
    expected, resumed = final_variables(baseline), final_variables(workdir)
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    # metrics.jsonl holds each step once.
    steps = [m["step"] for m in read_metrics(workdir) if "train_loss" in m]
    assert steps == sorted(set(steps))


def start_train(workdir: Path, *flags: str, cache: Path) -> subprocess.Popen:
    """``python train.py`` in the background, stdout and stderr in one text pipe."""
    cmd = [sys.executable, str(REPO / "train.py"), f"--workdir={workdir}", f"--compilation_cache_dir={cache}",
           *TINY, *flags]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **X64})


def read_until(proc: subprocess.Popen, prefix: str) -> str:
    """The output up to and including the first line starting with ``prefix``."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return "".join(seen)
    raise AssertionError(f"the run ended before printing {prefix!r}:\n{''.join(seen)[-3000:]}")


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``error: ...`` line of a refused train.py."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_ctrl_c_and_sigterm_save_and_exit_cleanly_and_a_held_workdir_is_refused(cache, tmp_path):
    """Ctrl-C used to die with a traceback, leave its save unfinished forever and lose the
    steps since the last checkpoint; a second run in the same workdir used to train too,
    deleting the first one's checkpoints in progress."""
    workdir = tmp_path / "wd"
    long_run = ("--config.checkpoint_every_steps=100", "--config.num_train_steps=400", "--config.eval_every_steps=400")
    first = start_train(workdir, *long_run, cache=cache)
    out = read_until(first, "step 4/")

    second = run_train(workdir, *long_run, cache=cache, check=False, timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"{workdir} is in use by another training run (pid {first.pid} on host {socket.gethostname()})" in (
        error_line(second))

    first.send_signal(signal.SIGINT)
    out += first.stdout.read()
    assert first.wait(timeout=120) == 0, out
    assert "Ctrl-C: saving after the current step" in out and "SIGINT received: saved step" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    saved = int(out.split("SIGINT received: saved step ")[1].split()[0])
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())  # all finished: names are numbers
    assert saved >= 4 and max(steps) == saved
    assert (workdir / ".lock").read_text() == ""  # released: it names no holder

    # What a run killed mid-save leaves: the next run removes it, then resumes.
    unfinished = workdir / "checkpoints" / f"{saved + 2}.orbax-checkpoint-tmp"
    (unfinished / "state").mkdir(parents=True)
    resumed = start_train(workdir, *long_run, cache=cache)
    out = read_until(resumed, "Resumed from")
    out += read_until(resumed, "step ")
    resumed.send_signal(signal.SIGTERM)
    out += resumed.stdout.read()
    assert resumed.wait(timeout=120) == 0, out
    assert f"Removed {unfinished.name}" in out and f"(step {saved} of 400)" in out
    assert "SIGTERM received: saved step" in out
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())  # all finished: names are numbers
    assert saved in steps and saved < max(steps) < 400


def test_a_second_ctrl_c_exits_at_once_without_saving(monkeypatch, capfd):
    from ca_flax.training import trainer

    exits = []
    monkeypatch.setattr(trainer.os, "_exit", exits.append)
    with trainer._Preemption() as preemption:
        signal.raise_signal(signal.SIGINT)
        assert preemption.requested and preemption.name == "SIGINT" and exits == []
        signal.raise_signal(signal.SIGINT)
        assert exits == [130]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "Ctrl-C again stops without saving" in capfd.readouterr().out


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(cache, tmp_path):
    workdir = tmp_path / "wd"
    result = run_train(workdir, "--config.learning_rate=1e30", "--config.checkpoint_every_steps=1", cache=cache,
                       check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "Loss became" in message and "at step" in message
    bad_step = int(message.split("at step ")[1].split(";")[0])
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert all(s < bad_step for s in saved)


def test_eight_devices_match_one_device(baseline, cache, tmp_path):
    workdir = tmp_path / "wd"
    run_train(workdir, cache=cache, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert_same_run(baseline, workdir)


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(baseline, cache, tmp_path):
    workdir = tmp_path / "wd"
    address = f"localhost:{_free_port()}"
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


def test_bfloat16_computes_in_bf16_and_keeps_parameters_statistics_and_optimizer_in_float32():
    from conftest import numpy_variables

    from ca_flax.training.optim import create_optimizer, learning_rate_schedule
    from ca_flax.training.state import create_train_state
    from ca_flax.training.steps import train_step
    from ca_flax.training.trainer import build_model

    config = _config(dtype="bfloat16", model="mobilenetv2_ca", warmup_epochs=0.0)
    config.model_kwargs.width_mult = 0.25
    model = build_model(config, num_classes=10)
    variables = numpy_variables(model, (1, 32, 32, 3))
    tx = create_optimizer(config, learning_rate_schedule(config, 10, 10))
    state = create_train_state(model, variables, tx, jax.random.PRNGKey(0))
    batch = {"image": jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32),
             "label": jnp.arange(4) % 10}
    logits = model.apply(state.variables(), batch["image"])
    assert logits.dtype == jnp.bfloat16  # the computation runs in bf16
    new_state, metrics = jax.jit(lambda s, b: train_step(s, b, num_classes=10))(state, batch)
    for tree in (new_state.params, new_state.batch_stats, new_state.opt_state):
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "dtype")} <= {
            jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
    assert np.isfinite(float(metrics["loss"]))
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
    assert all(jax.tree_util.tree_leaves(changed))


MOBILENEXT_RECIPE = dict(dtype="float32", batch_size=512, num_epochs=200, learning_rate=0.05, momentum=0.9,
                         weight_decay=1e-4, warmup_epochs=3.0, label_smoothing=0.1, grad_clip_norm=0.0)


@pytest.mark.parametrize("name, variant, expected", [
    ("gpu8", None, dict(dtype="bfloat16", batch_size=1024)),
    ("tpu", None, dict(dtype="bfloat16")),
    ("imagenet_mbv2_ca", None, dict(model="mobilenetv2_ca", dtype="float32", batch_size=256, num_epochs=200,
                                    momentum=0.9, weight_decay=4e-5)),
    ("imagenet_mobilenext", None, dict(model="mobilenext", **MOBILENEXT_RECIPE)),
    ("imagenet_mobilenext", "se", dict(model="mobilenext_se", **MOBILENEXT_RECIPE)),
    ("imagenet_mobilenext", "ca", dict(model="mobilenext_ca", **MOBILENEXT_RECIPE)),
])
def test_preset_configs_load_and_validate(name, variant, expected):
    """The presets parse, carry the documented settings and pass every check that needs
    no data (the dataset itself is checked against a real data_dir at run time)."""
    import importlib

    from ca_flax.models import registry
    from ca_flax.training.trainer import _augment, build_model, check_fields

    module = importlib.import_module(f"configs.{name}")
    config = module.get_config(variant) if variant else module.get_config()
    for key, value in expected.items():
        assert config[key] == value, (name, key)
    assert config.batch_size % 8 == 0  # an 8-device host splits it evenly
    check_fields(config)
    model = build_model(config, num_classes=1000)
    assert model.num_classes == 1000
    assert type(model) is type(registry.create_model(config.model))
    if name == "imagenet_mobilenext":
        assert model.width_mult == 1.0 and model.attention_position == "first_dw"
        assert _augment(config).color_jitter == 0.4


def test_mobilenext_preset_refuses_an_unknown_variant():
    from configs import imagenet_mobilenext

    with pytest.raises(ValueError, match="Unknown variant 'cbam'; choose one of"):
        imagenet_mobilenext.get_config("cbam")


# -- the workdir under faults (docs/workdir.md) ----------------------------------------


def workdir_files(workdir: Path) -> dict[str, bytes]:
    """Every file of ``workdir`` with its bytes: a refused run must leave them all as they were."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.fixture
def baseline_copy(baseline, tmp_path) -> Path:
    workdir = tmp_path / "wd"
    shutil.copytree(baseline, workdir)
    return workdir


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """TINY as an in-process config, in float32 (64-bit JAX is off here; the baseline's
    float64 checkpoints restore cast)."""
    config = _config()
    for flag in TINY:
        path, value = flag[len("--config."):].split("=")
        *parents, name = path.split(".")
        field = config
        for parent in parents:
            field = field[parent]
        if "," in value:
            field[name] = tuple(int(v) for v in value.split(","))
        else:
            field[name] = type(field[name])(value)
    config.update(dtype="float32", param_dtype="float32", **overrides)
    return config


def no_compile(*args, **kwargs):
    raise AssertionError("compiled, though the run had to stop before")


def test_a_rerun_with_another_model_is_refused_and_changes_nothing(baseline_copy, cache):
    """It used to write model.json first, and Orbax then refused with a 1,158-line tree
    diff suggesting strict=False; the workdir then restored into the wrong model."""
    before = workdir_files(baseline_copy)
    result = run_train(baseline_copy, "--config.model_kwargs.width_mult=0.5", "--config.model=mobilenetv2_se", cache=cache,
                       check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    message = error_line(result)
    for part in (f"{baseline_copy} holds checkpoints of another model than this run's",
                 'attention "ca" there, "se" in this run', "width_mult 0.25 there, 0.5 in this run",
                 "another --workdir", "--config.model=mobilenetv2_ca --config.model_kwargs.width_mult=0.25"):
        assert part in message, message
    assert "strict" not in result.stderr and "partial_restore" not in result.stderr
    assert workdir_files(baseline_copy) == before


def test_a_resume_the_optimizer_state_does_not_fit_is_refused_before_compiling(baseline_copy, monkeypatch):
    """An optimizer whose clipping adds a state to the chain (the real grad_clip_norm keeps
    the state as it is), switched to another threshold, so the saved state no longer fits."""
    from ca_flax.training import trainer

    def create_optimizer(config, schedule):
        tx = optim.create_optimizer(config, schedule)
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx) if config.get("grad_clip_norm") else tx

    monkeypatch.setattr(trainer, "create_optimizer", create_optimizer)
    monkeypatch.setattr(trainer, "initial_variables", no_compile)
    monkeypatch.setattr(trainer, "_compile", no_compile)
    config = tiny_config(num_train_steps=16)
    config.grad_clip_norm = 1.0
    before = workdir_files(baseline_copy)
    with pytest.raises(ValueError, match=r"checkpoints/8 holds a training state this run cannot continue: its "
                                         r"opt_state differs from this run's \(missing opt_state/1/"
                                         r".*The settings changed: grad_clip_norm \S+ there, 1.0 in this run\. "
                                         r".*nothing was changed\. Use another --workdir"):
        trainer.train_and_evaluate(config, baseline_copy)
    assert workdir_files(baseline_copy) == before


def test_a_rerun_of_a_finished_run_trains_nothing_and_changes_nothing(baseline_copy, cache, monkeypatch, capsys):
    """It used to print "step 8 of 4", then "Done"."""
    from ca_flax.training import trainer

    before = workdir_files(baseline_copy)
    result = run_train(baseline_copy, "--config.num_train_steps=4", cache=cache, timeout=120)
    assert (f"{baseline_copy} already holds step 8, past this run's 4 steps: nothing to train. Use another --workdir "
            "or raise num_train_steps") in result.stdout
    assert "Resumed" not in result.stdout and "Done" not in result.stdout
    assert workdir_files(baseline_copy) == before

    monkeypatch.setattr(trainer, "initial_variables", no_compile)
    monkeypatch.setattr(trainer, "_compile", no_compile)
    last_eval = trainer.train_and_evaluate(tiny_config(), baseline_copy)  # exactly at the last step
    assert "already holds step 8, this run's last: nothing to train" in capsys.readouterr().out
    assert last_eval == pytest.approx({k: v for k, v in read_metrics(baseline_copy)[-1].items() if k != "step"} | {
        "eval_examples": 360})
    assert workdir_files(baseline_copy) == before


def test_an_invalid_config_field_is_one_line_exit_2_before_anything(cache, tmp_path):
    """eval_batch_size=0 used to train, then crash at the first evaluation, unsaved."""
    result = run_train(tmp_path / "wd", "--config.eval_batch_size=0", cache=cache, check=False, timeout=120)
    assert result.returncode == 2 and error_line(result) == "error: eval_batch_size must be a positive integer, got 0."
    assert not (tmp_path / "wd").exists()


def test_an_unreadable_newest_checkpoint_is_set_aside_and_the_run_resumes_before_it(baseline, baseline_copy, cache):
    """A garbled file of the newest step used to stop the run with 150 lines of TensorStore."""
    from ca_flax.checkpoints import CheckpointWarning, restore

    for data in (baseline_copy / "checkpoints" / "8" / "state").rglob("d/*"):
        data.write_bytes(b"garbage")
    with pytest.warns(CheckpointWarning, match=r"skipped unreadable step 8 \(ValueError: .*\); read step 6 instead"):
        assert restore(baseline_copy)[2] == 6  # evaluation falls back too, changing nothing

    result = run_train(baseline_copy, cache=cache)
    assert "warning: checkpoint step 8 is unreadable (ValueError: " in result.stdout
    assert f"moved it to {baseline_copy / 'checkpoints' / '8.corrupt'}" in result.stdout
    assert f"Resumed from {baseline_copy / 'checkpoints' / '6'}" in result.stdout
    assert "tensorstore_spec" not in result.stderr and "Traceback" not in result.stderr
    kept = {p.name for p in (baseline_copy / "checkpoints").iterdir()}
    assert {"6", "8", "8.corrupt"} <= kept  # the intact ones stay; the bad one is kept aside, out of the count
    for a, b in zip(jax.tree_util.tree_leaves(final_variables(baseline)),
                    jax.tree_util.tree_leaves(final_variables(baseline_copy))):
        np.testing.assert_array_equal(a, b)  # steps 7 and 8 trained again, exactly
