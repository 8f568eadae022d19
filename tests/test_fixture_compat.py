"""Checkpoints written before the family-neutral redesign (issue #16) still load.

tests/fixtures/pre_redesign/ was written once by the code of before the redesign
(its make.py says how) and is never regenerated: a model checkpoint, a one-step
training workdir and the logits both gave on a fixed input.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from ca_flax import checkpoints
from ca_flax.models import create_model
from fixtures.pre_redesign.make import MODEL

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pre_redesign"


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "expected.npz") as data:
        return dict(data)


def _paths(variables) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(variables), sep="/").items()}


def _fresh_model():
    kwargs = dict(MODEL)
    return create_model(kwargs.pop("name"), **kwargs)


def _logits(model, variables, x) -> np.ndarray:
    return np.asarray(model.apply(variables, x, train=False))


@pytest.mark.parametrize("kind", ["model", "workdir"])
def test_a_pre_redesign_checkpoint_loads_with_the_same_paths_and_logits(kind, expected):
    model, variables, step = checkpoints.restore(FIXTURE / kind)
    assert step == (0 if kind == "model" else int(expected["workdir_step"]))
    fresh = _fresh_model()
    init = jax.eval_shape(lambda: fresh.init(jax.random.PRNGKey(0), expected["input"], train=False))
    assert _paths(variables) == _paths(init)
    np.testing.assert_allclose(_logits(model, variables, expected["input"]), expected[f"{kind}_logits"],
                               rtol=1e-5, atol=1e-5)


def test_model_json_is_written_as_before(tmp_path):
    """The same model saved now writes byte for byte the same model.json."""
    model, variables = checkpoints.load_model(FIXTURE / "model")
    source = json.loads((FIXTURE / "model" / checkpoints.METADATA_FILE).read_text())["source"]
    checkpoints.save_model(tmp_path / "again", model, variables, source=source)
    again = (tmp_path / "again" / checkpoints.METADATA_FILE).read_text()
    assert again == (FIXTURE / "model" / checkpoints.METADATA_FILE).read_text()


def _training_config():
    """The fixture workdir's training config, written the current way."""
    import ml_collections

    from configs import default

    config = default.get_config()
    config.model_kwargs = ml_collections.ConfigDict(
        {"width_mult": MODEL["width_mult"], "dropout_rate": 0.1, "depthwise_impl": "auto",
         "stage_repeats": MODEL["stage_repeats"], "head_channels": MODEL["head_channels"],
         "attention_kwargs": MODEL["attention_kwargs"]})
    config.update(image_size=32, batch_size=16, eval_batch_size=64, num_train_steps=2, log_every_steps=1,
                  eval_every_steps=1, checkpoint_every_steps=1, keep_checkpoints=1, async_checkpoints=False)
    return config


def test_a_pre_redesign_training_workdir_resumes(tmp_path):
    """What a rerun does before it compiles: the model check against model.json and the
    restore of the whole train state (optimizer state included) from the latest step."""
    from ca_flax.training import parallel, trainer, workdir as workdir_guard
    from ca_flax.training.checkpointing import CheckpointManager

    workdir = tmp_path / "workdir"
    shutil.copytree(FIXTURE / "workdir", workdir)
    config = _training_config()
    info, model = trainer.validate_config(config)
    workdir_guard.check_model(workdir, model, config)  # raises for another model
    steps_per_epoch, total_steps = trainer.plan_steps(config, info.num_train)
    tx = trainer.create_optimizer(config, trainer.learning_rate_schedule(config, steps_per_epoch, total_steps))
    replicated = parallel.replicated(parallel.make_mesh())
    settings = {name: config[name] for name in trainer._OPTIMIZER_FIELDS if name in config}
    manager = CheckpointManager(workdir, keep=1, async_save=False)
    try:
        _, rng = jax.random.split(jax.random.PRNGKey(config.seed))
        state, meta, set_aside = manager.restore_latest_intact(trainer._state_shapes(model, tx, rng, replicated),
                                                               settings)
    finally:
        manager.close()
    assert (int(state.step), meta["step"], set_aside) == (1, 1, [])
