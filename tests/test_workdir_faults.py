"""The workdir under faults (docs/workdir.md): a rerun with another model or optimizer, a
finished run, an invalid config, an unreadable newest checkpoint. Each refusal changes
nothing in the workdir; each recovery ends where an uninterrupted run does."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import pytest

from ca_flax.training import optim
from train_runs import TINY, error_line, final_variables, read_metrics, run_train


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
    from configs import default

    config = default.get_config()
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
