"""ca_flax.inference: eval-mode prediction sharded over devices, in micro-batches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import numpy_variables
from ca_flax.inference import make_predictor, predict_fn, resolve_micro_batch
from ca_flax.models import create_model

REPO = Path(__file__).resolve().parent.parent
TINY = dict(width_mult=0.25, stage_repeats=(1, 1, 1, 1, 1, 1, 1), num_classes=10)
SHAPE = (1, 32, 32, 3)


@pytest.fixture(scope="module")
def tiny():
    model = create_model("mobilenetv2_ca", **TINY)
    return model, numpy_variables(model, SHAPE)


def _reference(model, variables, images, **kwargs):
    """One jitted eval-mode call on the whole batch."""
    return jax.jit(lambda v, x: model.apply(v, x, train=False, **kwargs))(variables, images)


def _images(rows: int, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), (rows, *SHAPE[1:]))


@pytest.mark.parametrize("micro_batch", [None, 1, 3, "auto"])
def test_prediction_equals_one_eval_call_for_any_batch_size(tiny, micro_batch):
    model, variables = tiny
    images = _images(7)  # not a multiple of any micro-batch above: padded, then dropped
    expected = _reference(model, variables, images)
    got = make_predictor(model, micro_batch=micro_batch)(variables, images)
    assert got.shape == (7, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_prediction_of_another_method_returns_its_whole_tree(tiny):
    model, variables = tiny
    images = _images(5)
    expected = _reference(model, variables, images, method=model.features)
    got = make_predictor(model, micro_batch=2, method=model.features)(variables, images)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].shape == expected[name].shape
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_predict_fn_traces_inside_a_callers_jit(tiny):
    model, variables = tiny
    images = _images(4)
    top1 = jax.jit(lambda v, x: jnp.argmax(predict_fn(model, micro_batch=2)(v, x), -1))(variables, images)
    np.testing.assert_array_equal(top1, jnp.argmax(_reference(model, variables, images), -1))


def test_micro_batch_auto_is_chosen_per_backend_and_bad_values_are_refused():
    assert resolve_micro_batch("auto", "cpu") == 2
    assert resolve_micro_batch("auto", "gpu") is None and resolve_micro_batch("auto", "tpu") is None
    assert resolve_micro_batch(None) is None and resolve_micro_batch(4) == 4
    for bad in (0, -2, True, 2.5, "big"):
        with pytest.raises(ValueError, match="micro_batch"):
            resolve_micro_batch(bad, "cpu")


def test_bad_inputs_get_clear_errors(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match="non-empty batch"):
        make_predictor(model)(variables, jnp.zeros((0, *SHAPE[1:])))
    with pytest.raises(ValueError, match="'data' axis"):
        predict_fn(model, mesh=Mesh(np.asarray(jax.devices()), ("model",)))


def _run(script: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_one_cpu_device_per_core_then_sharded_prediction_matches():
    out = _run(f"""
        import sys
        import jax
        from ca_flax.inference import use_cpu_device_per_core, make_predictor
        assert use_cpu_device_per_core(4) == 4
        import numpy as np
        sys.path.insert(0, "tests")
        from conftest import numpy_variables
        from ca_flax.models import create_model
        model = create_model("mobilenetv2_ca", **{TINY!r})
        v = numpy_variables(model, (1, 32, 32, 3))
        assert jax.device_count() == 4, jax.devices()
        reference = jax.jit(lambda v, x: model.apply(v, x, train=False))
        # 7 rows: padded to 8 over the devices; 12 rows: 3 per device, padded on each to 4.
        for rows, micro_batch in ((7, 1), (12, 2)):
            x = jax.random.normal(jax.random.PRNGKey(rows), (rows, 32, 32, 3))
            got = make_predictor(model, micro_batch=micro_batch)(v, x)
            np.testing.assert_allclose(got, reference(v, x), rtol=1e-5, atol=1e-5)
        print("ok")
    """, env={"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    assert out.strip() == "ok"


def test_setting_the_cpu_device_count_after_jax_started_is_refused():
    out = _run("""
        import jax
        jax.numpy.ones(1).block_until_ready()
        from ca_flax.inference import use_cpu_device_per_core
        try:
            use_cpu_device_per_core()
        except RuntimeError as error:
            print("late:", error)
    """, env={"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    assert "late: use_cpu_device_per_core() must run before JAX's first computation" in out


def test_a_device_count_the_user_set_is_kept():
    out = _run("""
        import jax
        from ca_flax.inference import use_cpu_device_per_core
        print("count", use_cpu_device_per_core(), jax.device_count())
    """, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=3", "JAX_PLATFORMS": "cpu"})
    assert "count 3 3" in out
    with pytest.raises(ValueError, match="at least one device"):
        from ca_flax.inference import use_cpu_device_per_core
        use_cpu_device_per_core(0)


def test_inference_does_not_import_training():
    """Serving a model needs no trainer (nor its optimizer, data pipeline or TensorFlow)."""
    code = "import sys, ca_flax.inference; print(sorted(m for m in sys.modules if m.startswith('ca_flax.training')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
