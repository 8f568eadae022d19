"""The ca-flax model checkpoint (ca_flax/checkpoints.py): round trip, atomic writes, errors."""

from __future__ import annotations

import json

from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ca_flax import checkpoints
from ca_flax.checkpoints import (
    CheckpointError,
    abstract_variables,
    load_model,
    model_config,
    model_from_config,
    read_metadata,
    restore,
    save_model,
)
from ca_flax.models import MobileNetV2, create_model, registry


def _random_variables(model: MobileNetV2, seed: int = 0) -> dict:
    """Random values of the right shapes (model.init compiles slowly on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), abstract_variables(model))


@pytest.fixture(scope="module")
def model() -> MobileNetV2:
    return create_model(
        "mobilenetv2_ca", width_mult=0.25, num_classes=7, stage_repeats=(1, 2, 2, 2, 1, 1, 1),
        head_channels=96, attention_kwargs={"reduction": 16}, dropout_rate=0.2,
    )


@pytest.fixture(scope="module")
def variables(model) -> dict:
    return _random_variables(model)


def _assert_same(a: dict, b: dict) -> None:
    flat_a, tree_a = jax.tree_util.tree_flatten(dict(a))
    flat_b, tree_b = jax.tree_util.tree_flatten(dict(b))
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_config_round_trip(model):
    config = model_config(model)
    assert json.loads(json.dumps(config)) == config
    assert config["stage_repeats"] == [1, 2, 2, 2, 1, 1, 1]
    assert config["attention_kwargs"] == {"reduction": 16}
    rebuilt = model_from_config(config)
    assert rebuilt == model


def test_save_and_load_round_trip(tmp_path, model, variables):
    path = save_model(tmp_path / "ckpt", model, variables, source={"from": "test"})
    meta = json.loads((path / "model.json").read_text())
    assert meta["format"] == "ca-flax-model" and meta["version"] == 1 and meta["architecture"] == "MobileNetV2"
    assert meta["source"] == {"from": "test"}
    loaded_model, loaded = load_model(path)
    assert loaded_model == model
    _assert_same(loaded, variables)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_refuses_to_overwrite_unless_asked(tmp_path, model, variables):
    path = save_model(tmp_path / "ckpt", model, variables)
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        save_model(path, model, variables)
    other = _random_variables(model, seed=1)
    save_model(path, model, other, overwrite=True)
    _assert_same(load_model(path)[1], other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_interrupted_save_leaves_no_checkpoint(tmp_path, model, variables, monkeypatch):
    def crash(path, variables):
        (path / "partial").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "_save_variables", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(tmp_path / "ckpt", model, variables)
    assert list(tmp_path.iterdir()) == []


def test_variables_must_match_the_model(tmp_path, model, variables):
    wrong = _random_variables(model.clone(num_classes=3))
    with pytest.raises(CheckpointError, match=r"do not match the model: params/classifier/bias: shape \(3,\), expected \(7,\)"):
        save_model(tmp_path / "ckpt", model, wrong)
    assert not (tmp_path / "ckpt").exists()


def test_callable_activation_is_refused(model):
    with pytest.raises(CheckpointError, match="activation is a callable"):
        model_config(model.clone(activation=jax.nn.relu))


def test_the_recorded_fields_are_the_module_fields_but_runtime_ones():
    """In the order and with the names model.json has always had for MobileNetV2."""
    assert checkpoints.config_fields(MobileNetV2) == (
        "num_classes", "width_mult", "stage_repeats", "stem_channels", "head_channels", "attention",
        "attention_kwargs", "dropout_rate", "activation", "in_channels", "bn_momentum", "bn_epsilon",
    )


class TinyNet(nn.Module):
    """A stand-in for another registered family."""

    num_classes: int = 10
    features: Sequence[int] = (4,)
    norm: Mapping[str, Any] | None = None
    dtype: Any = None
    runtime_fields: ClassVar[tuple[str, ...]] = ("dtype",)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnp.mean(x, axis=(1, 2))
        for width in self.features:
            x = nn.Dense(width, dtype=self.dtype)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)


def test_any_registered_family_saves_and_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "tinynet", (TinyNet, {}, "a test family"))
    model = create_model("tinynet", num_classes=3, features=(5, 6), norm={"eps": 1e-3}, dtype=jnp.float32)
    assert model_config(model) == {"num_classes": 3, "features": [5, 6], "norm": {"eps": 1e-3}}
    path = save_model(tmp_path / "ckpt", model, _random_variables(model))
    assert json.loads((path / "model.json").read_text())["architecture"] == "TinyNet"
    loaded, variables = load_model(path)
    assert loaded == model.clone(dtype=None)  # a runtime field is not recorded
    _assert_same(variables, _random_variables(model))


def test_bad_configs():
    with pytest.raises(CheckpointError, match=r"Unknown configuration fields \['depth'\]"):
        model_from_config({"depth": 3})
    with pytest.raises(CheckpointError, match="Invalid model configuration: width_mult"):
        model_from_config({"width_mult": -1.0})
    with pytest.raises(CheckpointError, match="Unknown architecture 'ResNet'"):
        model_from_config({}, "ResNet")


@pytest.fixture
def saved(tmp_path, model, variables):
    return save_model(tmp_path / "ckpt", model, variables)


def _edit_metadata(path, **changes) -> None:
    meta = json.loads((path / "model.json").read_text())
    meta.update(changes)
    (path / "model.json").write_text(json.dumps(meta))


def test_load_errors(tmp_path, saved):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_model(tmp_path / "nope")
    (tmp_path / "w.pth").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file, not a ca-flax checkpoint directory.*python -m ca_flax.convert"):
        load_model(tmp_path / "w.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a ca-flax model checkpoint: it has no model.json"):
        load_model(tmp_path / "empty")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "something-else"}, "not a ca-flax model checkpoint"),
        ({"version": 2}, "format version 2, this ca-flax reads version 1; it was written by a newer ca-flax"),
        ({"version": "one"}, "format version 'one'"),
        ({"config": None}, 'has no "config" object'),
        ({"config": {"width_mult": 0.25, "colour": "red"}}, r"Unknown configuration fields \['colour'\]"),
        ({"config": {"width_mult": 0.5}}, "cannot be restored for the recorded configuration"),
    ],
    ids=["format", "newer-version", "bad-version", "no-config", "unknown-field", "config-mismatch"],
)
def test_metadata_errors(saved, change, message):
    _edit_metadata(saved, **change)
    with pytest.raises(CheckpointError, match=message):
        load_model(saved)


def test_corrupt_metadata(saved):
    (saved / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.json: not valid JSON"):
        read_metadata(saved)


def test_missing_variables(saved):
    import shutil

    shutil.rmtree(saved / "variables")
    with pytest.raises(CheckpointError, match=r"has neither variables/ \(a model checkpoint\) nor checkpoints/ \(a training workdir\)"):
        load_model(saved)


@pytest.fixture
def training_workdir(tmp_path, model, variables):
    """A trainer's workdir: model.json + orbax checkpoints/<step>/ at steps 10 (best) and 20."""
    optax = pytest.importorskip("optax")
    from ca_flax.training.checkpointing import CheckpointManager
    from ca_flax.training.state import create_train_state

    save_model(tmp_path / "ckpt", model, variables)
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "model.json").write_text((tmp_path / "ckpt" / "model.json").read_text())
    state = create_train_state(model, variables, optax.sgd(0.1, momentum=0.9), jax.random.key(0))
    later = jax.tree_util.tree_map(lambda x: x + 1, variables)
    manager = CheckpointManager(workdir, async_save=False)
    manager.save(state.replace(step=10), {"metrics": {"eval_top1": 0.6}}, {"eval_top1": 0.6})
    manager.save(state.replace(step=20, **later), {"metrics": {"eval_top1": 0.5}}, {"eval_top1": 0.5})
    manager.close()
    return workdir


def test_restore_reads_a_training_workdir(tmp_path, training_workdir, model, variables):
    """A trainer's workdir (model.json + orbax checkpoints/<step>/) loads like a model checkpoint."""
    assert restore(tmp_path / "ckpt")[2] == 0
    loaded_model, loaded, step = restore(training_workdir)
    assert loaded_model == model and step == 20
    _assert_same(loaded, jax.tree_util.tree_map(lambda x: x + 1, variables))
    _, best, step = restore(training_workdir, which="best")
    assert step == 10
    _assert_same(best, variables)
    with pytest.raises(CheckpointError, match="which must be 'latest' or 'best'"):
        restore(training_workdir, which="first")


def _files(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change, message", [
    # model.json rewritten for another width (what a refused resume did before): the
    # restore used to hand back the old width's arrays in a model of the new width.
    ({"width_mult": 0.35}, r"step 20 do not fit the model its model.json describes: "
                           r"batch_stats/blocks_0/depthwise/bn/mean: shape \(8,\), expected \(16,\)"),
    # ... or another attention: the restore used to leave ShapeDtypeStruct placeholders.
    ({"attention": "se", "attention_kwargs": None}, r"step 20 do not fit the model its model.json describes: missing "),
], ids=["width", "attention"])
def test_restore_refuses_variables_that_do_not_fit_the_model(training_workdir, change, message):
    meta = json.loads((training_workdir / "model.json").read_text())
    meta["config"].update(change)
    (training_workdir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoints.CheckpointMismatchError, match=message):
        restore(training_workdir)


def test_a_partial_restore_placeholder_counts_as_missing():
    expected = {"params": {"w": np.zeros((2, 3), np.float32)}}
    placeholder = {"params": {"w": jax.ShapeDtypeStruct((2, 3), np.float32)}}
    assert checkpoints.variables_mismatch(expected, placeholder) == ["missing params/w"]
    wrong_dtype = {"params": {"w": np.zeros((2, 3), np.float64)}}
    assert checkpoints.variables_mismatch(expected, wrong_dtype) == []
    assert checkpoints.variables_mismatch(expected, wrong_dtype, dtypes=True) == [
        "params/w: dtype float64, expected float32"]


def test_restore_skips_an_unreadable_newest_step_and_changes_nothing(training_workdir, variables, capfd):
    for data in (training_workdir / "checkpoints" / "20" / "state").rglob("d/*"):
        data.write_bytes(b"garbage")  # a garbled file of the newest step
    before = _files(training_workdir)
    with pytest.warns(checkpoints.CheckpointWarning, match=r"skipped unreadable step 20 \(ValueError: .*; read step 10"):
        _, loaded, step = restore(training_workdir)
    assert step == 10
    _assert_same(loaded, variables)
    assert _files(training_workdir) == before  # evaluation never changes a workdir
    assert "TensorStore" not in capfd.readouterr().err  # not a page of TensorStore specs

    import shutil

    shutil.rmtree(training_workdir / "checkpoints" / "10" / "state")
    with pytest.raises(CheckpointError, match=r"none of its 2 checkpoints can be read: step 20 \(ValueError.*step 10 \(.*nothing was changed"):
        restore(training_workdir)
