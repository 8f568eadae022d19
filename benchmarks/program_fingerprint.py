"""Fingerprints of the programs a model compiles to, to check that a refactor kept them.

    python benchmarks/program_fingerprint.py [--models mobilenetv2_ca,...] [--batch 32]
        [--image-size 224] [--dump DIR]

For each model, the lowered StableHLO (no debug locations) of ``jax.jit(model.apply)``
in eval mode and of a train step's loss and gradient (``value_and_grad`` of
cross-entropy over a train-mode apply with BatchNorm updates), hashed. Nothing is
compiled or run: lowering traces the model, so this takes seconds per model. Run it on
two trees (``PYTHONPATH=<tree>``) and compare: equal fingerprints mean the same compiled
programs, so any speed difference between them is the machine's. ``--dump`` writes the
texts for a diff.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from ca_flax.models import create_model


def programs(name: str, batch: int, size: int) -> dict[str, str]:
    """``{'eval': text, 'train': text}`` of the registered model ``name``."""
    model = create_model(name)
    x = jax.ShapeDtypeStruct((batch, size, size, model.in_channels), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x)

    def loss(params, variables, x):
        logits, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                                      rngs={"dropout": jax.random.PRNGKey(0)})
        labels = jnp.zeros(x.shape[0], jnp.int32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    return {
        "eval": jax.jit(model.apply).lower(variables, x).as_text(),
        "train": jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(variables["params"], variables, x).as_text(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mobilenetv2,mobilenetv2_se,mobilenetv2_cbam,mobilenetv2_ca",
                        help="comma-separated registered names")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dump", type=Path, default=None, help="write each program's text here")
    args = parser.parse_args()
    fingerprints = {}
    for name in args.models.split(","):
        texts = programs(name, args.batch, args.image_size)
        fingerprints[name] = {kind: hashlib.sha256(text.encode()).hexdigest()[:16] for kind, text in texts.items()}
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            for kind, text in texts.items():
                (args.dump / f"{name}_{kind}.mlir").write_text(text)
    print(json.dumps({"backend": jax.default_backend(), "jax": jax.__version__, "fingerprints": fingerprints},
                     indent=2))


if __name__ == "__main__":
    main()
