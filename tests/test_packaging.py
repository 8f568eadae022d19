"""The core install is the library alone; the rest asks for its extra by name.

One subprocess runs with the extras' packages blocked (``sys.modules[name] = None``, what
an uninstalled package looks like to ``import`` and to ``importlib.util.find_spec``):
the core modules import, a tiny model initializes and runs, and every module that needs
an extra raises an ImportError naming it. ``pyproject.toml`` is checked to say the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("tensorflow", "tensorflow_datasets", "clu", "sklearn", "ml_collections", "matplotlib", "torch",
           "ai_edge_litert", "tf2onnx", "onnx", "onnxruntime")
CORE_MODULES = ("ca_flax", "ca_flax.models", "ca_flax.attention", "ca_flax.layers", "ca_flax.checkpoints",
                "ca_flax.native", "ca_flax.convert", "ca_flax.data", "ca_flax.viz", "ca_flax.viz.curves")

SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    for name in BLOCKED:
        sys.modules[name] = None  # not installed
    results = {}

    def attempt(key, action):
        try:
            action()
            results[key] = "ok"
        except ImportError as error:
            results[key] = f"ImportError: {error}"

    for name in CORE_MODULES + ("ca_flax.inference",):
        attempt(name, lambda name=name: importlib.import_module(name))

    def tiny_model():
        import jax, jax.numpy as jnp
        from ca_flax.models import create_model
        model = create_model("mobilenetv2_ca", num_classes=3, width_mult=0.25, stage_repeats=(1,) * 7)
        x = jnp.ones((2, 32, 32, 3))
        logits = model.apply(model.init(jax.random.PRNGKey(0), x), x)
        assert logits.shape == (2, 3) and bool(jnp.isfinite(logits).all()), logits

    attempt("tiny_model", tiny_model)
    attempt("ca_flax.training", lambda: importlib.import_module("ca_flax.training"))
    attempt("ca_flax.evaluate", lambda: importlib.import_module("ca_flax.evaluate"))
    attempt("data_pipeline", lambda: importlib.import_module("ca_flax.data").train_batches)

    def read_image():
        from ca_flax.viz.images import EvalPreprocessing, read_image
        from ca_flax.data.config import AugmentConfig
        read_image("docs/images/digit_7.png", EvalPreprocessing("digits", 32, AugmentConfig()))

    attempt("read_image", read_image)

    def figure():
        from ca_flax.viz.plotting import new_figure
        new_figure(1, 1)

    attempt("figure", figure)
    results["leaked"] = sorted(n for n in BLOCKED if sys.modules.get(n) is not None)
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def blocked_run() -> dict:
    prelude = f"BLOCKED = {BLOCKED!r}\nCORE_MODULES = {CORE_MODULES!r}\n"
    result = subprocess.run([sys.executable, "-c", prelude + SCRIPT], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_core_modules_and_a_tiny_model_need_no_extra(blocked_run):
    assert {name: blocked_run[name] for name in CORE_MODULES} == {name: "ok" for name in CORE_MODULES}
    assert blocked_run["tiny_model"] == "ok"
    assert blocked_run["leaked"] == []


def test_inference_needs_no_extra(blocked_run):
    assert blocked_run["ca_flax.inference"] == "ok"


def test_train_py_without_the_train_extra_is_a_one_line_error():
    script = (f"import runpy, sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n"
              "sys.argv = ['train.py', '--help']\nrunpy.run_path('train.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: train.py needs") and "pip install 'ca-flax[train]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("key, user, extra, names", [
    ("ca_flax.training", "ca_flax.training", "train", ["tensorflow", "tensorflow_datasets", "clu", "ml_collections"]),
    ("ca_flax.evaluate", "python -m ca_flax.evaluate", "train", ["tensorflow", "sklearn"]),
    ("data_pipeline", "ca_flax.data", "train", ["tensorflow"]),
    ("read_image", "Reading image files", "viz", ["tensorflow"]),
    ("figure", "the pictures", "viz", ["matplotlib"]),
])
def test_a_missing_extra_is_named(blocked_run, key, user, extra, names):
    error = blocked_run[key]
    assert error.startswith(f"ImportError: {user}"), error
    assert f"pip install 'ca-flax[{extra}]'" in error, error
    missing = error.split("(missing: ")[-1]
    assert all(name in missing for name in names), error


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement_names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requirements}


def test_core_dependencies_are_the_library_only():
    assert requirement_names(project()["dependencies"]) == {
        "jax", "flax", "optax", "orbax-checkpoint", "numpy", "safetensors", "ml_dtypes"}


def test_extras():
    extras = {name: requirement_names(reqs) for name, reqs in project()["optional-dependencies"].items()}
    assert {"tensorflow-cpu", "tensorflow", "tensorflow-datasets", "clu", "tensorboard", "scikit-learn", "ml-collections",
            "absl-py", "matplotlib"} <= extras["train"]
    assert {"matplotlib", "tensorflow-cpu"} <= extras["viz"]
    assert {"tensorflow-cpu", "ai-edge-litert", "onnx", "onnxruntime", "tf2onnx"} <= extras["export"]
    assert extras["torch"] == {"torch"}
    test = project()["optional-dependencies"]["test"]
    assert "ca-flax[train,export,viz]" in test and {"pytest", "pytest-xdist"} <= extras["test"]


def test_every_subpackage_is_a_regular_package():
    # setuptools' find (pyproject.toml) installs only directories with an __init__.py.
    for directory in (REPO / "ca_flax").iterdir():
        if directory.is_dir() and any(directory.glob("*.py")):
            assert (directory / "__init__.py").exists(), directory


def test_the_readme_test_command_installs_the_test_extra():
    readme = (REPO / "README.md").read_text()
    line = readme.split("ci:test-command", 1)[1].split("```bash\n", 1)[1].splitlines()[0]
    assert line.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert 'pip install -e ".[test]" torch==2.13.0' in line and "python -m pytest -n 2 --dist loadfile" in line
