"""A model as plain XLA modules, for whatever reads the traced program rather than runs it.

On CPU a model's eval pass takes fast paths that are not plain XLA operations: native
kernels called through ``jax.ffi`` (custom calls, see :mod:`ca_flax.native`), a batch
run as a scan over micro-batches (``eval_micro_batch``) and depthwise convolutions
written as shifted slices (``depthwise_impl='auto'``). They compute the same values,
but an exporter cannot translate a custom call, and a cost analysis should see each
depthwise convolution as one convolution. :func:`plain_modules` switches all of them
off in one place (the model summary and the exporters use it).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

from flax import linen as nn

from ca_flax import native

# Module fields that pick a fast path, and the plain setting of each.
PLAIN_SETTINGS = {"depthwise_impl": "xla", "eval_micro_batch": None}


@contextlib.contextmanager
def plain_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Yields ``model`` with its fast paths off; trace it inside the block.

    The clone has the same parameters and computes the same values with standard XLA
    operations only: each depthwise convolution one grouped convolution, the batch in one
    pass, and (while the block is open) no native kernel. A function traced inside keeps
    that program after the block closes; one traced earlier by ``jax.jit`` keeps its own.
    """
    fields = {f.name for f in dataclasses.fields(model)}
    overrides = {name: value for name, value in PLAIN_SETTINGS.items() if name in fields}
    with native.disabled():
        yield model.clone(**overrides) if overrides else model


__all__ = ["PLAIN_SETTINGS", "plain_modules"]
