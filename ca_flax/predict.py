"""Classify image files with a training workdir or a converted checkpoint.

    python -m ca_flax.predict --checkpoint workdirs/default digit.png
    python -m ca_flax.predict --checkpoint ckpt/mbv2_ca cat.jpg dog.png --top-k 3 --json

Each file (JPEG, PNG, GIF, BMP) goes through the checkpoint's evaluation preprocessing,
the one ``python -m ca_flax.evaluate`` uses (``ca_flax.viz.images``), and the top-k
classes are printed with their names and probabilities. With ``--json``, one JSON object
per image per line: ``{"file": ..., "top_k": [{"index": i, "label": name, "probability":
p}, ...]}`` (plus ``"note"`` when a grayscale or RGBA file was converted to RGB), or
``{"file": ..., "error": message}`` for a file that cannot be read. Exit status 0, or 2
when any file failed (the others' results are still printed) or the checkpoint cannot be
used, with a one-line ``error:`` on stderr. Needs the ``viz`` extra's TensorFlow, which
decodes the images (``pip install 'ca-flax[viz]'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from ca_flax._extras import MissingExtraError
from ca_flax.checkpoints import CheckpointError, read_metadata, restore
from ca_flax.viz.cli import add_checkpoint_arguments
from ca_flax.viz.images import EvalPreprocessing, ImageError, eval_preprocessing, read_image
from ca_flax.viz.labels import Names, class_names


@dataclasses.dataclass
class Predictor:
    """A restored checkpoint ready to classify images.

    Attributes:
      model, variables, step: from ``ca_flax.checkpoints.restore``.
      preprocessing: its evaluation preprocessing.
      names: a name (or None) per class.
    """

    model: Any
    variables: Any
    step: int
    preprocessing: EvalPreprocessing
    names: Names
    _predict: Any = dataclasses.field(default=None, repr=False)  # jitted on first use

    def probabilities(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Softmax of the eval-mode logits of preprocessed images ``(N, S, S, 3)``, computed
        at most ``batch_size`` at a time (the last batch padded, so one compilation serves all)."""
        import jax

        if self._predict is None:
            from ca_flax.inference import make_predictor

            self._predict = make_predictor(self.model)
        batch_size = max(1, min(batch_size, len(images)))
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            padded = np.zeros((batch_size, *chunk.shape[1:]), np.float32)
            padded[:len(chunk)] = chunk
            logits = self._predict(self.variables, padded)[:len(chunk)]
            out.append(np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1)))
        return np.concatenate(out) if out else np.zeros((0, len(self.names)), np.float32)


def load_predictor(checkpoint: str | os.PathLike[str], *, which: str = "latest", dataset: str | None = None,
                   image_size: int | None = None, data_dir: str | None = None) -> Predictor:
    """The checkpoint at ``checkpoint`` with its preprocessing and class names;
    ``dataset``/``image_size`` override what it records, ``data_dir`` finds the class
    names of a ``folder`` or TFDS dataset."""
    metadata = read_metadata(checkpoint)
    preprocessing = eval_preprocessing(metadata, dataset=dataset, image_size=image_size)
    model, variables, step = restore(checkpoint, which=which)
    if not model.num_classes:
        raise CheckpointError(f"{checkpoint}: the model has no classifier (num_classes=0); nothing to predict.")
    return Predictor(model, variables, step, preprocessing, class_names(preprocessing.dataset, model.num_classes,
                                                                        data_dir))


def top_k(probabilities: np.ndarray, names: Names, k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes, most probable first (ties: lower index first)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"index": int(i), "label": names[i], "probability": float(probabilities[i])} for i in order]


def predict_files(predictor: Predictor, files: Sequence[str | os.PathLike[str]], *, k: int = 5,
                  batch_size: int = 32) -> list[dict[str, Any]]:
    """One result per file, in order: ``{"file", "top_k"[, "note"]}`` or ``{"file", "error"}``.
    A file that fails does not stop the others."""
    results: list[dict[str, Any]] = [{"file": os.fspath(f)} for f in files]
    images, where = [], []
    for i, path in enumerate(files):
        try:
            image, note = read_image(path, predictor.preprocessing)
        except ImageError as error:
            results[i]["error"] = str(error)
            continue
        if note:
            results[i]["note"] = note
        images.append(image)
        where.append(i)
    if images:
        probabilities = predictor.probabilities(np.stack(images), batch_size)
        for i, p in zip(where, probabilities):
            results[i]["top_k"] = top_k(p, predictor.names, k)
    return [{key: r[key] for key in ("file", "top_k", "note", "error") if key in r} for r in results]


def format_result(result: dict[str, Any]) -> str:
    """A successful result as text: the file, then one line per class (probability,
    name, index)."""
    lines = [f"{result['file']}" + (f"  ({result['note']})" if "note" in result else "")]
    for entry in result["top_k"]:
        label = f"{entry['label']}  " if entry["label"] is not None else ""
        lines.append(f"  {entry['probability']:7.2%}  {label}(class {entry['index']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ca_flax.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG, PNG, GIF or BMP files")
    add_checkpoint_arguments(parser)
    parser.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image per line")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    # TensorFlow decodes the images; its C++ warnings (a failed decode logs one) would
    # only repeat our one-line error.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("top_k", "batch_size", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}.")
    try:
        predictor = load_predictor(args.checkpoint, which=args.which, dataset=args.dataset,
                                   image_size=args.image_size, data_dir=args.data_dir)
        results = predict_files(predictor, args.images, k=args.top_k, batch_size=args.batch_size)
    except (CheckpointError, ValueError, MissingExtraError) as error:  # MissingExtraError: no TensorFlow
        print(f"error: {error}", file=sys.stderr)
        return 2
    for result in results:
        if "error" in result:
            print(f"error: {result['error']}", file=sys.stderr, flush=True)
        if args.json or "error" not in result:
            print(json.dumps(result) if args.json else format_result(result), flush=True)
    return 2 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
