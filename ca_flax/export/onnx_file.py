"""ONNX conversion and runtime.

The path (docs/export.md says why this one): the float LiteRT flatbuffer of
:func:`ca_flax.export.litert.to_tflite` through ``tf2onnx``'s LiteRT reader, its input
and output renamed ``images`` and ``logits``; int8 is onnxruntime's static
quantization (QDQ, int8 weights per output channel and int8 activations), calibrated
on the given images. The file runs in onnxruntime on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ca_flax.export.litert import INPUT_NAME, Runner

OUTPUT_NAME = "logits"
OPSET = 17


def _tidy_names(model: Any) -> None:
    """Input ``images``, output ``logits``, and short names for every other value and
    node (the LiteRT names carry JAX's whole name stack, kilobytes per node)."""
    graph = model.graph
    mapping = {graph.input[0].name: INPUT_NAME, graph.output[0].name: OUTPUT_NAME}
    for name in [t.name for t in graph.initializer] + [out for node in graph.node for out in node.output]:
        if name and name not in mapping:
            mapping[name] = f"t{len(mapping)}"
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        value.name = mapping.get(value.name, value.name)
    for index, node in enumerate(graph.node):
        node.input[:] = [mapping.get(name, name) for name in node.input]
        node.output[:] = [mapping.get(name, name) for name in node.output]
        node.name = f"{node.op_type}_{index}"


def to_onnx(tflite: bytes) -> bytes:
    """The ONNX model of a float LiteRT flatbuffer, with input ``images`` and output ``logits``."""
    import tf2onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        path.write_bytes(tflite)
        with _quiet("tf2onnx"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf2onnx reads the file with the deprecated tf.lite.Interpreter
            model, _ = tf2onnx.convert.from_tflite(str(path), opset=OPSET)
    _tidy_names(model)
    return model.SerializeToString()


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Only errors from ``loggers`` (tf2onnx narrates every pass; onnxruntime's
    quantizer suggests a pre-processing step on the root logger) while the block runs."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in (*loggers, "")]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def quantize_onnx(model: bytes, calibration: Iterable[np.ndarray]) -> bytes:
    """The int8 (QDQ) version of a float ONNX model, activation ranges calibrated on
    ``calibration`` (batches of the model's input shape)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: np.asarray(batch, np.float32)}

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(model)
        with _quiet("onnxruntime"):
            quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return target.read_bytes()


def onnx_runner(path: str | os.PathLike[str], num_threads: int | None = None) -> Runner:
    """``images -> logits`` through onnxruntime (CPU) for the file at ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: np.asarray(images, np.float32)})[0]


def onnx_io(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Name, shape and dtype of the file's input and output."""
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    args = {"input": session.get_inputs()[0], "output": session.get_outputs()[0]}
    return {k: {"name": a.name, "shape": list(a.shape), "dtype": a.type.removeprefix("tensor(").rstrip(")")
                .replace("float", "float32")} for k, a in args.items()}


def onnx_ops(path: str | os.PathLike[str]) -> Counter[str]:
    """How many of each op type the file's graph holds."""
    import onnx

    return Counter(node.op_type for node in onnx.load(os.fspath(path)).graph.node)


__all__ = ["OPSET", "OUTPUT_NAME", "onnx_io", "onnx_ops", "onnx_runner", "quantize_onnx", "to_onnx"]
