"""The CPU fast paths, and the one switch that turns them all off.

On CPU the layers take paths that compute the same values as their plain modules, but
faster: native kernels called through ``jax.ffi`` (:mod:`ca_flax.native`), depthwise
convolutions as shifted multiply-adds and dense stems as a patch matmul ('auto'
implementations), and an eval-mode batch run in micro-batches. Each layer decides for
itself, when it is traced (docs/performance.md describes them).

Whatever reads a traced program rather than runs it wants the plain modules: a cost
analysis should see a depthwise convolution as one convolution, an exporter cannot
translate a custom call. Trace it inside :func:`disabled`::

    with ca_flax.fast_paths.disabled():
        exported = jax.export.export(jax.jit(model.apply))(variables, images)

Parameters are the same either way. A function ``jax.jit`` traced before the block
keeps its program, one traced inside keeps the plain one after the block closes.
``CA_FLAX_NATIVE=0`` in the environment turns off the native kernels alone (the other
fast paths are plain XLA operations).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

_disabled: contextvars.ContextVar[bool] = contextvars.ContextVar("ca_flax_fast_paths_disabled", default=False)


def enabled() -> bool:
    """False inside :func:`disabled`, where every layer traces its plain XLA modules."""
    return not _disabled.get()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Layers traced inside this block use their plain XLA modules: no native kernel,
    each depthwise and dense convolution one XLA convolution, the batch in one pass."""
    token = _disabled.set(True)
    try:
        yield
    finally:
        _disabled.reset(token)


__all__ = ["disabled", "enabled"]
