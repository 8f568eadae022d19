"""Export to LiteRT (``.tflite``) and ONNX (``.onnx``), verified in each file's runtime.

>>> from ca_flax.export import export_tflite, export_onnx
>>> export_tflite(model, variables, "model.tflite", image_size=224)      # + model.tflite.json
>>> export_onnx(model, variables, "model.onnx", image_size=224)

Command line: ``python -m ca_flax.export CHECKPOINT OUTPUT [--quantize int8 --calibration
DATASET]`` (see ``__main__.py``). The exported graph takes NHWC float32 images normalized
as in training and returns logits; it is traced from the plain modules (no native
kernels) with BatchNorm folded into the convolutions (``graph.py``). The paths:
``litert.py`` (jax2tf, then TensorFlow's LiteRT converter) and ``onnx_file.py`` (that
LiteRT file through tf2onnx); docs/export.md says why. Needs the ``export`` extra:
``pip install 'ca-flax[export]'``.
"""

from ca_flax.export.api import (
    SHA256_DEFINITION, TOLERANCE, VerificationError, checkpoint_sha256, export, export_onnx, export_tflite,
    sidecar_path,
)
from ca_flax.export.graph import ExportError, custom_calls, fold_batch_norm, serving_function, stablehlo_text

__all__ = [
    "ExportError", "SHA256_DEFINITION", "TOLERANCE", "VerificationError", "checkpoint_sha256", "custom_calls",
    "export", "export_onnx", "export_tflite", "fold_batch_norm", "serving_function", "sidecar_path", "stablehlo_text",
]
