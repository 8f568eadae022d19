"""Converted weights give PyTorch's outputs: logits and every stage's feature map.

Reference modules (tests/torch_reference.py) get random weights and BatchNorm
statistics, are converted with ``from_torch`` and both sides run the same images.
Errors are ``max |ca-flax - torch| / max |torch|`` per output.

- float32 at full size, 224 (even) and 225 (odd: every stride-2 layer sees an odd size),
  for the authors' CA model, one torchvision and one timm model; the other six variants
  at a small odd size (49: odd at every stride-2 layer).
- float64 (jax x64, torch double), small inputs, one model per layout: 1e-10.

Feature maps get a looser float32 bound than logits: in a deep random network each
implementation's float32 rounding reaches ~5e-5 of the head map's range (PyTorch float32
is as far from float64 as ca-flax is), while the logits average it away. A padding or
stride bug moves a map by O(0.1 - 1), so 5e-4 still catches it; the 1e-10 float64
bound checks everything exactly.
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))

import torch_reference as tr  # noqa: E402

from ca_flax import native  # noqa: E402
from ca_flax.convert import from_torch  # noqa: E402

LOGIT_RTOL = 1e-4
FEATURE_RTOL = 5e-4
X64_RTOL = 1e-10
FULL_SIZE = ("official_mbv2_ca_w1.0", "torchvision_mobilenet_v2_w1.0", "timm_mobilenetv2_110d")
SMALL = tuple(n for n in tr.LAYOUT_NAMES if n not in FULL_SIZE)
X64_MODELS = ("official_mbv2_ca_w0.5", "torchvision_mobilenet_v2_w0.5", "timm_mobilenetv2_050")


@functools.lru_cache(maxsize=None)
def _reference(name: str) -> torch.nn.Module:
    return tr.randomize_(tr.build_from_layout_name(name), seed=0).eval()


@functools.lru_cache(maxsize=None)
def _converted(name: str, double: bool = False):
    """``(reference, jitted ca-flax forward)``, built once per model (and precision)."""
    reference = _reference(name)
    if double:
        reference = copy.deepcopy(reference).double()
    model, variables, _ = from_torch(reference.state_dict())

    # One pass gives the logits and, captured on the way, the output of ``features``.
    # Variables are an argument, not closed over: XLA would fold them in as constants.
    @jax.jit
    def apply(variables, x):
        logits, state = model.apply(
            variables, x, capture_intermediates=lambda _, method: method == "features", mutable=["intermediates"]
        )
        return logits, state["intermediates"]["features"][0]

    return reference, functools.partial(apply, variables)


def _images(size: int, dtype: torch.dtype = torch.float32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size), dtype=dtype)


def _relative_errors(reference: torch.nn.Module, forward, x: torch.Tensor) -> dict[str, float]:
    """``logits`` and every feature map: max abs error over the reference's max abs value."""
    with torch.no_grad():
        expected = {"logits": reference(x), **reference.forward_features(x)}
    logits, features = forward(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    got = {"logits": logits, **features}
    assert sorted(features) == sorted(tr.FEATURE_NAMES)
    errors = {}
    for name, want in expected.items():
        want = want.numpy() if want.ndim == 2 else want.numpy().transpose(0, 2, 3, 1)
        have = np.asarray(got[name])
        assert have.shape == want.shape and have.dtype == want.dtype, name
        errors[name] = float(np.max(np.abs(have - want)) / np.max(np.abs(want)))
    return errors


def _check(errors: dict[str, float], logit_rtol: float, feature_rtol: float) -> None:
    assert errors["logits"] < logit_rtol, errors
    bad = {k: v for k, v in errors.items() if k != "logits" and not v < feature_rtol}
    assert not bad, errors


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 225])
@pytest.mark.parametrize("name", FULL_SIZE)
def test_float32_full_size(name, size):
    _check(_relative_errors(*_converted(name), _images(size)), LOGIT_RTOL, FEATURE_RTOL)


@pytest.mark.parametrize("name", SMALL)
def test_float32_small_input(name):
    _check(_relative_errors(*_converted(name), _images(49)), LOGIT_RTOL, FEATURE_RTOL)


@pytest.mark.parametrize("name", X64_MODELS)
def test_float64(name):
    with jax.enable_x64(True):
        reference, forward = _converted(name, double=True)
        errors = _relative_errors(reference, forward, _images(33, torch.float64))
    _check(errors, X64_RTOL, X64_RTOL)


def test_outputs_depend_on_the_input():
    """Guards the comparisons above: a network whose output ignored the image (dead
    activations, saturated gates) would match any implementation."""
    _, forward = _converted(SMALL[0])  # compiled already, for this input shape
    logits, _ = forward(jnp.asarray(_images(49).numpy().transpose(0, 2, 3, 1)))
    logits = np.asarray(logits)
    assert logits.std(axis=0).mean() > 0.1 * logits.std()


@pytest.mark.parametrize(
    "name, size, batch",
    [pytest.param("official_mbv2_ca_w1.0", 224, 10, marks=pytest.mark.slow), ("official_mbv2_ca_w0.5", 49, 3),
     ("torchvision_mobilenet_v2_w0.5", 49, 3), ("timm_mobilenetv2_050", 49, 3)],
)
def test_float32_default_inference_path(name, size, batch):
    """``model.apply`` as users call it: the captures above run the modules as written; a
    plain call runs, on CPU, the native inference units and (10 images) eval micro-batches."""
    reference = _reference(name)
    model, variables, _ = from_torch(reference.state_dict())
    x = _images(size, batch=batch)
    with torch.no_grad():
        want = reference(x).numpy()
    images = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    if jax.default_backend() == "cpu" and native.expand_depthwise_inference_target() is not None:
        text = jax.jit(model.apply).lower(variables, images).as_text()
        assert "CaFlaxDepthwiseInference" in text and "CaFlaxExpandDepthwiseInference" in text
    got = np.asarray(jax.jit(model.apply)(variables, images))
    assert float(np.max(np.abs(got - want)) / np.max(np.abs(want))) < LOGIT_RTOL


def test_a_nan_pixel_gives_nan_logits_as_in_pytorch():
    """NaN propagates as in PyTorch (whose ReLU6 keeps it): in eval mode only the poisoned
    image's logits are NaN, on the native inference units as with the modules as written;
    in training mode the batch statistics carry it to every image."""
    reference = _reference("official_mbv2_ca_w0.5")
    model, variables, _ = from_torch(reference.state_dict())
    x = _images(33, batch=3)
    x[0, 1, 20, 10] = float("nan")
    with torch.no_grad():
        want_eval = reference(x).numpy()
        want_train = copy.deepcopy(reference).train()(x).numpy()
    assert np.isnan(want_eval[0]).all() and np.isfinite(want_eval[1:]).all() and np.isnan(want_train).all()
    images = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))

    def program():  # a new function each time: jax reuses the trace of one it has seen
        return jax.jit(lambda v, x: model.apply(v, x))

    fused = program()
    if jax.default_backend() == "cpu" and native.expand_depthwise_inference_target() is not None:
        assert "CaFlaxExpandDepthwiseInference" in fused.lower(variables, images).as_text()
    with native.disabled():
        plain = program()
        assert "DepthwiseInference" not in plain.lower(variables, images).as_text()
        plain = np.asarray(plain(variables, images))
    train = model.apply(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})[0]
    for got, want in ((fused(variables, images), want_eval), (plain, want_eval), (train, want_train)):
        np.testing.assert_array_equal(np.isnan(np.asarray(got)), np.isnan(want))
