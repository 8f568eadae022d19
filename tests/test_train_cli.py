"""train.py's command line: every config field settable as a flag, one-line errors, --help,
the workdir checks and undecodable images naming their file.

Flag parsing runs in-process through ``cli.parse_flags`` (what ``app.run`` calls), on a
fresh ``FlagValues`` per case; the exit codes and the single stderr line are checked on
real ``train.py`` processes that fail before JAX or TensorFlow is imported (a fraction
of a second each).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import ConfigDict

from ca_flax.training import cli

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections loading configs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["configs/default.py", "configs/imagenet_mbv2_ca.py", "configs/imagenet_mobilenext.py", "configs/gpu8.py",
           "configs/tpu.py", "configs/fake_data_benchmark.py"]


def parse(*args: str) -> flags.FlagValues:
    """The config ``train.py ARGS`` trains with (flags parsed as app.run parses them)."""
    flag_values = flags.FlagValues()
    cli.parse_flags(["train.py", *args], flag_values)
    return flag_values


def field_type(config: ConfigDict, name: str) -> type:
    *parents, leaf = name.split(".")
    for parent in parents:
        config = config[parent]
    return config.get_type(leaf)


def other_value(value, kind: type):
    """A value of ``kind`` that differs from ``value``."""
    if kind is bool:
        return not value
    if kind in (int, float):
        return value + kind(3)
    if kind is tuple:
        return tuple(x / 2 for x in value)
    return f"{value}_x" if value else "/some/dir"


def every_field() -> list[tuple[str, str]]:
    return [(spec, name) for spec in CONFIGS for name, _ in cli.config_fields(cli.load_config(spec))]


@pytest.mark.parametrize("spec, name", every_field())
def test_every_field_of_every_config_is_settable_from_the_command_line(spec, name, monkeypatch):
    # As --help prints values (cli.command_line_value), so what --help shows can be typed back.
    monkeypatch.chdir(REPO)
    config = cli.load_config(spec)
    old = dict(cli.config_fields(config))[name]
    kind = field_type(config, name)
    new = other_value(old, kind)
    parsed = dict(cli.config_fields(parse(f"--config={spec}", f"--config.{name}={cli.command_line_value(new)}").config))
    assert parsed[name] == new and type(parsed[name]) is kind
    assert {k: v for k, v in parsed.items() if k != name} == {k: v for k, v in cli.config_fields(config) if k != name}


def test_data_dir_tuples_booleans_and_new_model_options(monkeypatch):
    monkeypatch.chdir(REPO)
    for spec in CONFIGS:
        assert parse(f"--config={spec}").config.data_dir is None  # unset by default
    assert parse("--config.dataset=folder", "--config.data_dir=/my/images").config.data_dir == "/my/images"
    for args in (["--config.augment.area_range=0.5,1.0"], ["--config.augment.area_range=(0.5, 1.0)"],
                 ["--config.augment.area_range=0.5", "--config.augment.area_range=1.0"]):
        assert parse(*args).config.augment.area_range == (0.5, 1.0)
    assert parse("--config.augment.flip").config.augment.flip is True
    assert parse("--config=configs/imagenet_mbv2_ca.py", "--noconfig.augment.flip").config.augment.flip is False
    config = parse("--config.model_kwargs.stage_repeats=1,1,2,3,2,2,1",
                   "--config.model_kwargs.attention_kwargs={'reduction': 8}").config
    assert config.model_kwargs.stage_repeats == (1, 1, 2, 3, 2, 2, 1)
    assert dict(config.model_kwargs.attention_kwargs) == {"reduction": 8}
    assert config.model_kwargs.dropout_rate == 0.1  # the config's keys stay
    with pytest.raises(AttributeError):
        config.new_field = 1  # locked after parsing, as lock_config=True did


def test_default_workdir_is_named_after_the_config(monkeypatch):
    monkeypatch.chdir(REPO)
    for args, name in (((), "default"), (("--config=configs/imagenet_mbv2_ca.py:se",), "imagenet_mbv2_ca")):
        assert cli.default_workdir(parse(*args)["config"].config_filename) == os.path.join("workdirs", name)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.learning_rat=0.1"],
         "--config.learning_rat: no such config field (did you mean --config.learning_rate?)"),
        (["--config.augmnt.flip=false"], "--config.augmnt.flip: no such config field (did you mean --config.augment.flip?)"),
        (["--config.model_kwargs.a.b=1"], "--config.model_kwargs.a.b: no such config field"),
        # The flags of before issue #16.
        (["--config.width_mult=0.5"], "--config.width_mult=0.5 was moved: write --config.model_kwargs.width_mult=0.5 "
                                      "instead"),
        (["--config.model_overrides.stage_repeats=1,1,1,1,1,1,1"],
         "was moved: write --config.model_kwargs.stage_repeats=1,1,1,1,1,1,1 instead"),
        (["--config=configs/nope.py"], "--config=configs/nope.py: no such config file"),
        (["--config=configs/imagenet_mbv2_ca.py:xyz"], "--config=configs/imagenet_mbv2_ca.py:xyz: Unknown variant 'xyz'"),
        (["--config.num_epochs=0.5"], "flag --config.num_epochs=0.5: invalid literal for int()"),
        (["--workdri=/tmp/x"], "Unknown command line flag 'workdri'. Did you mean: workdir ?"),
        (["configs/default.py"], "unexpected argument(s) ['configs/default.py']"),
        (["--config.learning_rate=0.1", "--config=configs/default.py"], "Found --config.learning_rate=0.1 in argv before"),
    ],
)
def test_flag_errors_are_one_line_and_exit_2(args, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        parse(*args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert message in err


def test_flagfile_overrides_are_checked_too(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "good.flags").write_text("--config.learning_rate=0.2\n--config.model_kwargs.stage_repeats=1,1,1,1,1,1,1\n")
    config = parse(f"--flagfile={tmp_path / 'good.flags'}").config
    assert config.learning_rate == 0.2 and config.model_kwargs.stage_repeats == (1,) * 7
    (tmp_path / "typo.flags").write_text("--config.learning_rat=0.2\n")
    with pytest.raises(SystemExit):
        parse(f"--flagfile={tmp_path / 'typo.flags'}")
    assert "error: --config.learning_rat: no such config field" in capsys.readouterr().err


COUNTED_CONFIG = """
from pathlib import Path

from configs import default

def get_config():
    with open(Path(__file__).with_suffix(".loads"), "a") as loads:
        loads.write("load\\n")
    return default.get_config()
"""


def test_the_config_file_is_loaded_once(tmp_path, monkeypatch, capsys):
    # Loaded to check the overrides' names, then handed to the config flag, not loaded again.
    monkeypatch.chdir(REPO)
    (tmp_path / "counted.py").write_text(COUNTED_CONFIG)
    config = parse(f"--config={tmp_path / 'counted.py'}", "--config.learning_rate=0.2").config
    assert config.learning_rate == 0.2
    assert (tmp_path / "counted.loads").read_text() == "load\n"
    with pytest.raises(SystemExit):
        parse(f"--config={tmp_path / 'counted.py'}", "--help")
    assert "  --config.learning_rate=" in capsys.readouterr().out
    assert (tmp_path / "counted.loads").read_text() == "load\n" * 2


def test_a_bad_flag_fails_before_jax_or_tensorflow_is_imported():
    script = ("import runpy, sys\nsys.argv = ['train.py', '--config.learning_rat=0.1']\n"
              "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit as exit_:\n"
              "    print(exit_.code, sorted({'jax', 'tensorflow', 'flax', 'numpy'} & set(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout == "2 []\n", result.stderr
    assert result.stderr.startswith("error: --config.learning_rat: no such config field"), result.stderr

def test_workdir_checks(tmp_path):
    cli.check_workdir(str(tmp_path / "new" / "run"))  # created later by the trainer
    cli.check_workdir(str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"file is a file, not a directory"):
        cli.check_workdir(str(tmp_path / "file"))
    with pytest.raises(ValueError, match=r"sub is under .*file, a file, not a directory"):
        cli.check_workdir(str(tmp_path / "file" / "sub"))
    cli.check_workdir("gs://bucket/run")  # remote: left to its filesystem


def test_workdir_that_cannot_be_written_even_by_root():
    # Tests run as root, who ignores permission bits: sysfs refuses new entries to everyone
    # (EPERM), so a workdir there is a real unwritable location.
    workdir = "/sys/ca_flax_workdir"
    if os.access("/sys", os.W_OK) and not os.path.isdir("/sys/kernel"):
        pytest.skip("no sysfs here")
    with pytest.raises(ValueError, match=r"--workdir=/sys/ca_flax_workdir is not writable: cannot create anything in /sys"):
        cli.check_workdir(workdir)
    with pytest.raises(ValueError, match=r"--workdir=/sys/kernel is not writable"):
        cli.check_workdir("/sys/kernel")


def test_model_kwargs_are_model_options(monkeypatch):
    from ca_flax.checkpoints import model_config
    from ca_flax.training.trainer import build_model

    monkeypatch.chdir(REPO)
    config = parse("--config.model_kwargs.stage_repeats=1,1,2,1,1,1,1",
                   "--config.model_kwargs.attention_kwargs={'reduction': 8}").config
    model = build_model(config, num_classes=10)  # what the trainer builds and writes to model.json
    assert model.width_mult == 0.35  # the config's own keys stay
    assert model_config(model)["stage_repeats"] == [1, 1, 2, 1, 1, 1, 1]
    assert model_config(model)["attention_kwargs"] == {"reduction": 8}

    config = cli.load_config(cli.DEFAULT_CONFIG)
    config.model_kwargs.stage_repeat = (1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"^config.model_kwargs.stage_repeat: mobilenetv2_ca has no option "
                                         r"'stage_repeat' \(did you mean stage_repeats\?\); its options: activation, "
                                         r"attention, .*, width_mult\.$"):
        build_model(config, num_classes=10)
    del config.model_kwargs["stage_repeat"]
    config.model_kwargs.dtype = "bfloat16"
    with pytest.raises(ValueError, match=r"config.model_kwargs.dtype: set by config.dtype, not here"):
        build_model(config, num_classes=10)
    del config.model_kwargs["dtype"]
    config.model_kwargs.width_mult = -1.0
    with pytest.raises(ValueError, match=r"config.model_kwargs=.*width_mult must be a positive finite number"):
        build_model(config, num_classes=10)


OLD_CONFIG = """
import ml_collections
from configs import default

def get_config():
    config = default.get_config()
    del config["model_kwargs"]
    config.width_mult = 0.5
    config.model_overrides = ml_collections.ConfigDict({"dropout_rate": 0.2, "stage_repeats": (1, 1, 2, 1, 1, 1, 1)})
    return config
"""


def test_a_config_of_before_model_kwargs_is_refused_saying_what_to_write(tmp_path, monkeypatch):
    from ca_flax.training import trainer

    monkeypatch.chdir(REPO)
    (tmp_path / "old.py").write_text(OLD_CONFIG)
    config = parse(f"--config={tmp_path / 'old.py'}").config  # the flags parse: it is the trainer's to refuse
    with pytest.raises(ValueError) as error:
        trainer.validate_config(config)
    assert str(error.value) == (
        "config.width_mult and config.model_overrides were moved: write config.model_kwargs.width_mult = 0.5; "
        "config.model_kwargs.dropout_rate = 0.2; config.model_kwargs.stage_repeats = (1, 1, 2, 1, 1, 1, 1) "
        "(command line: --config.model_kwargs.width_mult=0.5 --config.model_kwargs.dropout_rate=0.2 "
        "--config.model_kwargs.stage_repeats=1,1,2,1,1,1,1).")
    config.unlock()
    del config["model_overrides"]
    with pytest.raises(ValueError, match=r"^config.width_mult was moved: write config.model_kwargs.width_mult = 0.5 "
                                         r"\(command line: --config.model_kwargs.width_mult=0.5\)\.$"):
        trainer.validate_config(config)


def run_train(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=os.environ)


def test_train_py_errors_help_and_helpfull(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "old.py").write_text(OLD_CONFIG)
    for args, message in (
        (["--config.learning_rat=0.1"], "error: --config.learning_rat: no such config field (did you mean "
                                        "--config.learning_rate?); `python train.py --help` lists them."),
        (["--config=configs/nope.py"], f"error: --config=configs/nope.py: no such config file {REPO}/configs/nope.py"),
        ([f"--workdir={tmp_path / 'file'}"], f"error: --workdir={tmp_path / 'file'} is a file, not a directory"),
        (["--workdir=/sys/ca_flax_workdir"], "error: --workdir=/sys/ca_flax_workdir is not writable"),
        (["--config.width_mult=0.5"], "error: --config.width_mult=0.5 was moved: write "
                                      "--config.model_kwargs.width_mult=0.5 instead"),
        ([f"--config={tmp_path / 'old.py'}", f"--workdir={tmp_path / 'run'}"],
         "error: config.width_mult and config.model_overrides were moved: write config.model_kwargs.width_mult = 0.5;"),
    ):
        result = run_train(*args)
        assert (result.returncode, result.stdout) == (2, ""), result.stderr
        assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    result = run_train("--config=configs/imagenet_mbv2_ca.py:se", "--config.data_dir=/data/tfds", "--help")
    assert result.returncode == 0 and result.stderr == ""
    assert "config fields of configs/imagenet_mbv2_ca.py:se (overrides applied)" in result.stdout
    for line in ("--workdir: Checkpoints", "  --config.data_dir=/data/tfds\n", "  --config.model=mobilenetv2_se\n",
                 "  --config.augment.area_range=0.08,1.0\n", "  --config.augment.flip=true\n",
                 "  --config.model_kwargs.dropout_rate=0.1\n", "  --config.model_kwargs.KEY=VALUE"):
        assert line in result.stdout
    full = run_train("--helpfull")
    assert full.returncode == 0 and "absl.logging:" in full.stdout and "  --config.data_dir=\n" in full.stdout


# -- undecodable images ------------------------------------------------------------------


def test_undecodable_images_name_their_file(tmp_path):
    tf = pytest.importorskip("tensorflow")
    from ca_flax.data import eval_batches, train_batches
    from ca_flax.data.pipeline import UndecodableImageError

    image = tf.io.encode_jpeg(tf.zeros([12, 10, 3], tf.uint8)).numpy()
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                (tmp_path / split / cls / f"{i}.jpg").write_bytes(image)
    (tmp_path / "train" / "b" / "1.jpg").write_bytes(b"not an image")
    (tmp_path / "val" / "a" / "2.jpg").write_bytes(image[:100])  # truncated in its header
    kwargs = dict(data_dir=tmp_path, image_size=8, global_batch_size=2)
    with pytest.raises(UndecodableImageError, match=rf"'folder' \(train split\): cannot decode {tmp_path}/train/b/1.jpg "
                                                    r"\(Unknown image file format.*\)\. Replace or delete it and rerun"):
        for _ in zip(range(6), train_batches("folder", seed=0, **kwargs)):  # 3 batches an epoch: every file
            pass
    with pytest.raises(UndecodableImageError, match=rf"\(val split\): cannot decode {tmp_path}/val/a/2.jpg \(Invalid JPEG"):
        list(eval_batches("folder", **kwargs))
    assert issubclass(UndecodableImageError, ValueError)  # train.py: one line, exit code 2


def test_undecodable_images_of_a_tfds_stream_name_the_batch():
    tf = pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    from ca_flax.data import train_batches
    from ca_flax.data.pipeline import UndecodableImageError

    def records(self, split, decoders=None, **kwargs):
        return tf.data.Dataset.from_tensor_slices({"image": [b"not an image"] * 4, "label": tf.zeros([4], tf.int64)})

    with tfds.testing.mock_data(as_dataset_fn=records):
        with pytest.raises(UndecodableImageError, match=r"'mnist' \(train split\): batch 0 of this run failed: "
                                                        r"Unknown image file format"):
            next(train_batches("mnist", image_size=8, global_batch_size=2, seed=0))


def test_an_empty_data_dir_means_unset(monkeypatch):
    from ca_flax.data import dataset_info

    monkeypatch.chdir(REPO)
    assert parse("--config.data_dir=").config.data_dir == ""
    with pytest.raises(ValueError, match="Dataset 'folder' needs data_dir"):
        dataset_info("folder", "")
