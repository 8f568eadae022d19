"""Shared test setup: tests/ on sys.path (for torch_reference), the order files run in,
and small helpers."""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


def param_count(tree) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


# -- order: the slowest files first -----------------------------------------------------

# ``pytest -n 2 --dist loadfile`` (the CI command) hands whole files to the two workers in
# collection order, so a long file collected last runs alone on one worker while the other
# idles. These files go first, slowest first (seconds are from one CI run on 2 cores, both
# workers busy); every other file follows in its usual order.
SLOWEST_FIRST = [
    "test_default_run.py",  # three real default training runs, ~200 s each
    "test_training.py",  # the baseline train.py run and ten more
    "test_training_parallel.py",  # 8 devices, 2 processes: ~100 s each
    "test_workdir_faults.py",
    "test_readme_commands.py",
    "test_native.py",
    "test_export.py",
    "test_registry.py",
    "test_mobilenetv2.py",
]


def pytest_configure(config):
    # pytest-xdist by default sorts the files by how many tests each has, most first: that
    # put test_default_run.py (3 tests, ~11 minutes) and test_training_parallel.py last.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture
def rng() -> jax.Array:
    return jax.random.PRNGKey(0)


def numpy_variables(model, input_shape, seed: int = 0) -> dict:
    """Random variables of the right shapes without running the model's initializers.

    XLA compiles one threefry kernel per parameter on CPU, which makes ``model.init``
    take 10+ s even for tiny networks; tests that do not test initialization fill the
    shapes from ``jax.eval_shape`` with numpy instead (variances kept positive, scales
    near 1, conv weights scaled by fan-in so activations stay O(1)).
    """
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(input_shape, jnp.float32), train=False)
    )
    gen = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "var":
            return jnp.asarray(gen.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        if name == "scale":
            return jnp.asarray(gen.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
            if len(leaf.shape) == 4 and leaf.shape[2] == 1:  # depthwise: fan-in is the window
                fan_in = leaf.shape[0] * leaf.shape[1]
            return jnp.asarray(gen.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)
        return jnp.asarray(0.1 * gen.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


# -- train.py end to end (tests/train_runs.py) -----------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A persistent compilation cache per test module (its train.py runs share it)."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="session")
def shared_baseline(tmp_path_factory) -> Path:
    """One uninterrupted tiny train.py run (tests/train_runs.py's TINY) per pytest session,
    in ``wd``, with the compilation cache it filled in ``jax_cache``.

    test_training.py, test_training_parallel.py and test_workdir_faults.py all compare with
    the same run, and pytest-xdist runs them in different worker processes: the first to
    need it runs it under a lock in the directory the session's workers share (the parent
    of each worker's basetemp), the others wait and read it. Nothing writes to it after.
    """
    from train_runs import run_train

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    root = root / "shared_baseline"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (root / "done").exists():
            shutil.rmtree(root / "wd", ignore_errors=True)
            result = run_train(root / "wd", cache=root / "jax_cache")
            assert "Done: 8 steps" in result.stdout
            (root / "done").touch()
    return root


@pytest.fixture(scope="module")
def baseline(shared_baseline, cache) -> Path:
    """The session's baseline run (``shared_baseline``) every other run of the module is
    compared with; the module's cache starts with the programs it compiled."""
    shutil.copytree(shared_baseline / "jax_cache", cache, dirs_exist_ok=True)
    return shared_baseline / "wd"
