"""The trainer: optimizer and steps in-process; train.py end to end in subprocesses
(resume after SIGKILL, SIGTERM, Ctrl-C, NaN, evaluation, pictures), bfloat16 and the
preset configs. 8 devices and 2 processes: tests/test_training_parallel.py; the workdir
under faults: tests/test_workdir_faults.py.

The end-to-end runs share one tiny configuration (tests/train_runs.py) and one
persistent compilation cache, so only the first run pays for compiling.
"""

from __future__ import annotations

import json
import math
import os
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

from train_runs import REPO, TINY, X64, error_line, final_variables, read_metrics, run_train

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
    # what was installed before (SIG_IGN where the test runner was started in the
    # background by a shell without job control)
    before = signal.getsignal(signal.SIGINT)
    with trainer._Preemption() as preemption:
        signal.raise_signal(signal.SIGINT)
        assert preemption.requested and preemption.name == "SIGINT" and exits == []
        signal.raise_signal(signal.SIGINT)
        assert exits == [130]
    assert signal.getsignal(signal.SIGINT) is before
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


def test_bfloat16_computes_in_bf16_and_keeps_parameters_statistics_and_optimizer_in_float32():
    from conftest import numpy_variables

    from ca_flax.training.optim import create_optimizer, learning_rate_schedule
    from ca_flax.training.state import create_train_state
    from ca_flax.training.steps import train_step
    from ca_flax.training.trainer import build_model

    config = _config(dtype="bfloat16", model="mobilenetv2_ca", warmup_epochs=0.0)
    config.model_kwargs.width_mult = 0.25
    config.model_kwargs.stage_repeats = (1,) * 7  # every kind of block, a third of the compile
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
    assert config.batch_size % 8 == 0 and config.eval_batch_size % 8 == 0  # an 8-device host splits them evenly
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
