"""LiteRT (TFLite) conversion and runtime.

The path (docs/export.md says why this one): the serving function
(:func:`ca_flax.export.graph.serving_function`) through ``jax2tf`` (StableHLO in a
``tf.function``), then TensorFlow's LiteRT converter, which legalizes the StableHLO to
builtin LiteRT ops; int8 is the converter's post-training full-integer quantization
with float32 input and output. The file runs in ``ai-edge-litert``'s interpreter
(TensorFlow's own ``tf.lite.Interpreter`` where that package is missing).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import linen as nn

from ca_flax.export.graph import serving_function

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

INPUT_NAME = "images"

Runner = Callable[[np.ndarray], np.ndarray]


def to_tflite(
    model: nn.Module, variables: Mapping[str, Any], input_shape: tuple[int, ...], *,
    representative: Iterable[np.ndarray] | None = None,
) -> bytes:
    """The LiteRT flatbuffer of ``model`` (float32, or int8 when ``representative``
    batches of ``input_shape`` images are given to calibrate it)."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    spec = tf.TensorSpec(input_shape, tf.float32, name=INPUT_NAME)
    with serving_function(model, variables, input_shape) as fn:
        # Lowered for the CPU whatever the default backend: the converter reads the
        # StableHLO, and a GPU lowering could carry GPU-only custom calls.
        converted = jax2tf.convert(fn, with_gradient=False, native_serialization_platforms=("cpu",))
        function = tf.function(converted, input_signature=[spec], autograph=False)
        concrete = function.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], function)
    if representative is not None:
        batches = [np.asarray(b, np.float32) for b in representative]
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([b] for b in batches)
        # Every op in int8 (the conversion fails rather than silently keep float ops);
        # the input and output stay float32, so the file is called as the float one.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # int8: "statistics for quantized inputs" (the input stays float32)
        return converter.convert()


def _interpreter_module() -> Any:
    try:
        from ai_edge_litert import interpreter
    except ImportError:  # pragma: no cover - the export extra installs it
        import tensorflow as tf

        interpreter = tf.lite
    return interpreter


def runtime_name() -> str:
    """Which LiteRT runtime :func:`tflite_runner` uses."""
    return "tf.lite.Interpreter" if _interpreter_module().__name__.startswith("tensorflow") else "ai_edge_litert"


def tflite_runner(path: str | os.PathLike[str], num_threads: int | None = None) -> Runner:
    """``images -> outputs`` through the LiteRT interpreter for the file at ``path``
    (images of the exported shape, float32)."""
    interpreter = _interpreter_module().Interpreter(model_path=os.fspath(path), num_threads=num_threads)
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]["index"]
    target = interpreter.get_output_details()[0]["index"]

    def run(images: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(source, np.asarray(images, np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(target).copy()

    return run


def tflite_io(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Name, shape and dtype of the file's input and output."""
    interpreter = _interpreter_module().Interpreter(model_path=os.fspath(path))
    details = {"input": interpreter.get_input_details()[0], "output": interpreter.get_output_details()[0]}
    return {k: {"name": d["name"], "shape": [int(n) for n in d["shape"]], "dtype": np.dtype(d["dtype"]).name}
            for k, d in details.items()}


def tflite_ops(path: str | os.PathLike[str]) -> Counter[str]:
    """How many of each op the file holds (read without delegates, which would hide them)."""
    module = _interpreter_module()
    resolvers = getattr(module, "OpResolverType", None) or module.experimental.OpResolverType  # tf.lite keeps it there
    interpreter = module.Interpreter(
        model_path=os.fspath(path), experimental_op_resolver_type=resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    interpreter.allocate_tensors()
    return Counter(op["op_name"] for op in interpreter._get_ops_details())


__all__ = ["INPUT_NAME", "Runner", "runtime_name", "tflite_io", "tflite_ops", "tflite_runner", "to_tflite"]
