"""The README's train.py commands, read from README.md's Training section, as typed.

Every line of its ``bash`` blocks that starts with ``python train.py`` is parsed in-process
(cli.parse_flags, as app.run calls it), so a command whose flags or config fields
cannot be parsed fails here. Then a command per kind of data runs as a real process, with
tiny sizes, a temporary workdir and the test's data appended (a later flag overrides an
earlier one): an image folder and a prepared TFDS 'mnist', both made here (offline),
ImageNet with a data_dir that does not exist (a one-line error naming it, exit code 2),
and --help. Not run here, each train.py start costing seconds of imports and compiling:
digits (tests/test_training.py runs train.py on it) and synthetic data (the trainer's
own input, nothing of the command line or the data pipeline).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags

from ca_flax.training import cli

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
# Small enough to compile in seconds; the same model for every 10-class dataset, so the
# runs after the first load it from the shared compilation cache.
TINY = ["--config.num_train_steps=2", "--config.model_kwargs.width_mult=0.25", "--config.image_size=32",
        "--config.batch_size=8", "--config.eval_batch_size=8", "--config.model_kwargs.stage_repeats=1,1,1,1,1,1,1"]


def readme_commands() -> list[str]:
    """The ``python train.py`` lines of the bash blocks of README.md's Training section."""
    section = (REPO / "README.md").read_text().split("\n## Training\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.startswith("python train.py")]


def command_args(command: str) -> list[str]:
    return shlex.split(command, comments=True)[2:]


def parsed(command: str) -> flags.FlagValues:
    flag_values = flags.FlagValues()
    cli.parse_flags(["train.py", *command_args(command)], flag_values)
    return flag_values


def kind(command: str) -> str:
    """What a command needs to run: 'help', or the dataset it trains on."""
    if {"--help", "--helpfull"} & set(command_args(command)):
        return "help"
    dataset = parsed(command).config.dataset
    return dataset if dataset in ("digits", "folder", "fake", "imagenet2012") else "tfds"


def test_the_readme_lists_commands_for_every_kind_of_data():
    kinds = {kind(c) for c in readme_commands()}
    assert kinds == {"digits", "folder", "tfds", "imagenet2012", "fake", "help"}, readme_commands()


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses_as_typed(command, monkeypatch):
    monkeypatch.chdir(REPO)
    if kind(command) == "help":
        with pytest.raises(SystemExit) as exit_:
            parsed(command)
        assert exit_.value.code == 0
        return
    fields = dict(cli.config_fields(parsed(command).config))
    for arg in command_args(command):  # each --config.FIELD=VALUE reached the config
        if match := re.match(r"--config\.([\w.]+)=(.*)", arg):
            assert cli.command_line_value(fields[match.group(1)]) == match.group(2)


def first_command(of_kind: str) -> str:
    return next(c for c in readme_commands() if kind(c) == of_kind)


def run(command: str, *extra: str, workdir: Path, cache: Path) -> subprocess.CompletedProcess:
    """The README command as typed, then the test's flags (later flags win)."""
    args = [sys.executable, str(REPO / "train.py"), *command_args(command), *TINY, f"--workdir={workdir}",
            f"--compilation_cache_dir={cache}", *extra]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=400, env=os.environ)


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, no traceback, and the message on one `error: ...` line."""
    assert result.returncode == 2, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> Path:
    """A data_dir holding a prepared 'mnist': the registered builder's name, version and
    features, prepared here from 20 + 10 random images instead of the downloaded files;
    ``tfds.builder('mnist', data_dir=...)`` in train.py reads it like the real one."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.image_classification.mnist import MNIST

    class RandomMnist(MNIST, skip_registration=True):
        name = "mnist"

        def _split_generators(self, dl_manager):
            return {"train": self._random_examples(0, 20), "test": self._random_examples(1, 10)}

        def _random_examples(self, seed, n):
            rng = np.random.default_rng(seed)
            for i in range(n):
                yield i, {"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), "label": i % 10}

    data_dir = tmp_path_factory.mktemp("tfds")
    RandomMnist(data_dir=str(data_dir)).download_and_prepare()
    assert tfds.builder("mnist", data_dir=str(data_dir)).info.splits["train"].num_examples == 20
    return data_dir


def make_images(root: Path) -> Path:
    """A tiny image folder: 10 classes, JPEGs and PNGs written by TensorFlow."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("val", 1)):
        for cls in range(10):
            (root / split / f"class{cls}").mkdir(parents=True)
            for i in range(count):
                image = tf.constant(rng.integers(0, 256, (24 + 4 * i, 20, 3), dtype=np.uint8))
                encoded = tf.io.encode_jpeg(image) if i % 2 == 0 else tf.io.encode_png(image)
                (root / split / f"class{cls}" / f"{i}.{'jpg' if i % 2 == 0 else 'png'}").write_bytes(encoded.numpy())
    return root


def test_folder_command_trains_then_names_an_undecodable_image(cache, tmp_path):
    # One run for two checks: the folder trains, and the evaluation, which reads every
    # val/ file, meets a planted undecodable JPEG and names it.
    images = make_images(tmp_path / "images")
    (images / "val" / "class3" / "0.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    result = run(first_command("folder"), f"--config.data_dir={images}", workdir=tmp_path / "wd", cache=cache)
    assert [m["step"] for m in read_metrics(tmp_path / "wd") if "train_loss" in m] == [2], result.stderr[-3000:]
    assert_one_line_error(result, f"cannot decode {images}/val/class3/0.jpg (", "Replace or delete it")


def test_tfds_command(tfds_dir, cache, tmp_path):
    result = run(first_command("tfds"), f"--config.data_dir={tfds_dir}", workdir=tmp_path / "wd", cache=cache)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Done: 2 steps" in result.stdout and "(10 examples)" in result.stdout  # the whole test split
    metrics = read_metrics(tmp_path / "wd")
    assert [m["step"] for m in metrics if "train_loss" in m] == [m["step"] for m in metrics if "eval_top1" in m] == [2]


def test_imagenet_command_names_a_missing_data_dir(cache, tmp_path):
    missing = tmp_path / "no_tfds_here"
    result = run(first_command("imagenet2012"), f"--config.data_dir={missing}", workdir=tmp_path / "wd", cache=cache)
    assert_one_line_error(result, f"data_dir={missing}, which does not exist", "imagenet2012")


def test_help_command():
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *command_args(first_command("help"))], cwd=REPO,
                            capture_output=True, text=True, timeout=60, env=os.environ)
    assert result.returncode == 0 and "  --config.data_dir=\n" in result.stdout, result.stderr
