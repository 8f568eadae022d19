"""The function an exporter traces: eval mode, plain modules, BatchNorm folded.

Every exporter starts from :func:`serving_function`: ``images -> logits`` for NHWC float32
images, in eval mode, with the model's CPU fast paths off (:func:`ca_flax.fast_paths.disabled`:
no native kernels, which are FFI custom calls no converter can translate) and every
BatchNorm that directly follows a convolution folded into it (:func:`fold_batch_norm`),
so a converter sees ``conv -> bias add`` as mobile runtimes fuse it, with one rounding
less per layer in int8.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ca_flax import fast_paths
from ca_flax.layers.conv import PointwiseConv
from ca_flax.layers.norm import BatchNorm

# Below the network's total stride (32) the last stride-2 stages run on 1x1 maps made
# mostly of padding; such a model is not one anybody trained, so it is refused.
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 4096

Path = tuple[str, ...]


class ExportError(ValueError):
    """Bad input to an export (checkpoint, output, image size, dataset): the message
    says what is wrong and how to fix it."""


def check_image_size(image_size: int, batch_size: int = 1, channels: int = 3) -> tuple[int, int, int, int]:
    """The exported input shape ``(batch, size, size, channels)``; :class:`ExportError`
    for a size the network cannot take or a batch below 1."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not (
        MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE
    ):
        raise ExportError(
            f"image size {image_size!r} is outside what the network takes: use an integer from "
            f"{MIN_IMAGE_SIZE} (the network's total stride; smaller inputs shrink to 1x1 maps before the last "
            f"stages) to {MAX_IMAGE_SIZE}, e.g. 224 for ImageNet weights or the size the model was trained at."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExportError(f"batch size must be a positive integer, got {batch_size!r}.")
    return (batch_size, image_size, image_size, channels)


def _bn_producers(model: nn.Module, variables: Mapping[str, Any], shape: tuple[int, ...]) -> dict[Path, tuple[Path, float]]:
    """``{batch norm path: (producer path, epsilon)}`` for every BatchNorm whose input is
    exactly the output of a sibling module's call (a convolution in practice), recorded
    by intercepting the module calls of one abstract eval pass of the plain model."""
    outputs: dict[int, Path] = {}
    keep: list[Any] = []  # the outputs stay alive, so their ids are not reused
    found: dict[Path, tuple[Path, float]] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, BatchNorm) and context.method_name == "__call__" and args:
            producer = outputs.get(id(args[0]))
            if producer is not None and producer[:-1] == module.path[:-1]:
                found[tuple(module.path)] = (producer, float(module.epsilon))
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and hasattr(out, "shape"):
            outputs[id(out)] = tuple(module.path)
            keep.append(out)
        return out

    def run(variables, x):
        with nn.intercept_methods(interceptor):
            return model.apply(variables, x, train=False)

    jax.eval_shape(run, variables, jax.ShapeDtypeStruct(shape, jnp.float32))
    return found


def _subtree(tree: dict[str, Any], path: Path) -> dict[str, Any] | None:
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
        if tree is None:
            return None
    return tree


def _unit_variance(epsilon: float) -> np.float32:
    """A float32 ``v`` with ``float32(v + epsilon) == 1``, so a folded BatchNorm's
    ``rsqrt(var + eps)`` is exactly 1 and a converter drops the multiply."""
    eps = np.float32(epsilon)
    v = np.float32(1) - eps
    for _ in range(64):
        total = np.float32(v + eps)
        if total == 1:
            return v
        v = np.nextafter(v, np.float32(2 if total < 1 else 0), dtype=np.float32)
    return np.float32(1) - eps  # not reached for any epsilon well below 1


def fold_batch_norm(model: nn.Module, variables: Mapping[str, Any], input_shape: tuple[int, ...]) -> dict[str, Any]:
    """``variables`` with every BatchNorm that directly follows a convolution folded into it.

    The convolution's kernel is scaled per output channel (its last axis) by
    ``scale / sqrt(var + eps)``; the BatchNorm keeps only a shift (mean 0, a variance
    that makes ``rsqrt(var + eps)`` exactly 1, scale 1) and the convolution's bias, if
    any, moves into it. The model is unchanged: it computes the same function to float
    rounding (the exporters check that on the exported file). BatchNorms whose input is
    not a sibling convolution's output are left as they are. Returns a new tree of numpy
    arrays; ``variables`` is not modified.
    """
    tree = jax.tree_util.tree_map(lambda a: np.array(a, copy=True), {k: dict(v) for k, v in variables.items()})
    if "batch_stats" not in tree:
        return tree
    with fast_paths.disabled():
        producers = _bn_producers(model, variables, input_shape)
    for bn_path, (producer_path, epsilon) in producers.items():
        bn, stats = _subtree(tree["params"], bn_path), _subtree(tree["batch_stats"], bn_path)
        conv = _subtree(tree["params"], producer_path)
        if bn is None or stats is None or conv is None or set(conv) - {"kernel", "bias"} or "kernel" not in conv:
            continue
        if conv["kernel"].shape[-1] != bn["scale"].shape[-1]:
            continue
        mul = (bn["scale"] / np.sqrt(stats["var"].astype(np.float64) + epsilon)).astype(np.float64)
        shift = bn["bias"] - stats["mean"] * mul + (conv["bias"] * mul if "bias" in conv else 0.0)
        conv["kernel"] = (conv["kernel"] * mul).astype(conv["kernel"].dtype)
        if "bias" in conv:
            conv["bias"] = np.zeros_like(conv["bias"])
        bn["scale"] = np.ones_like(bn["scale"])
        bn["bias"] = shift.astype(bn["bias"].dtype)
        stats["mean"] = np.zeros_like(stats["mean"])
        stats["var"] = np.full_like(stats["var"], _unit_variance(epsilon))
    return tree


@contextlib.contextmanager
def serving_function(
    model: nn.Module, variables: Mapping[str, Any], input_shape: tuple[int, ...], *, fold: bool = True
) -> Iterator[Callable[[jax.Array], jax.Array]]:
    """Yields ``images -> logits`` over the plain modules (eval mode, BatchNorm folded
    unless ``fold=False``, the variables closed over as constants); trace it inside the
    block (see :func:`ca_flax.fast_paths.disabled`)."""
    if fold:
        variables = fold_batch_norm(model, variables, input_shape)
    with fast_paths.disabled():
        yield functools.partial(_apply, model, variables)


def _apply(model: nn.Module, variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
    with nn.intercept_methods(_pointwise_as_convolution):
        return model.apply(variables, images, train=False)


def _pointwise_as_convolution(next_fun, args, kwargs, context):
    """Computes a :class:`PointwiseConv` on an NHWC map as a 1x1 convolution (its kernel
    is already ``(1, 1, in, out)``) instead of a matmul over the last axis: the same
    products, and TensorFlow 2.21's LiteRT converter fails on a matmul of a
    ``(1, 1, 1, C)`` map (``tfl.batch_matmul ... expected 3 but got 4``), which every
    input of 32 pixels or less gives the last stages. Other calls run as written."""
    module = context.module
    if not (isinstance(module, PointwiseConv) and context.method_name == "__call__" and args
            and getattr(args[0], "ndim", 0) == 4):
        return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(args[0], kernel, bias, dtype=module.dtype)
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias if bias is not None else y


def stablehlo_text(model: nn.Module, variables: Mapping[str, Any], input_shape: tuple[int, ...]) -> str:
    """The StableHLO of the exported function, as the exporters lower it."""
    with serving_function(model, variables, input_shape) as fn:
        return jax.jit(fn).lower(jax.ShapeDtypeStruct(input_shape, jnp.float32)).as_text()


def custom_calls(stablehlo: str) -> list[str]:
    """The ``custom_call`` targets in a StableHLO text (none may reach a converter)."""
    calls = []
    for line in stablehlo.splitlines():
        if "custom_call" in line:
            start = line.find("@")
            calls.append(line[start + 1:].split("(")[0] if start >= 0 else line.strip())
    return calls


__all__ = [
    "ExportError", "MAX_IMAGE_SIZE", "MIN_IMAGE_SIZE", "check_image_size", "custom_calls", "fold_batch_norm",
    "serving_function", "stablehlo_text",
]
