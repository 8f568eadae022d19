"""Batched inference: ``model.apply`` in eval mode, sharded over a mesh, in micro-batches.

    predict = make_predictor(model)                  # jitted; any batch size
    logits = predict(variables, images)              # (N, H, W, 3) -> (N, classes)

Each device runs its share of the batch as a sequence of ``micro_batch``-image calls of
the model (``lax.map`` inside one compiled program). Eval-mode BatchNorm uses the running
statistics, so the images are independent and the result is the same as one call on
the whole batch. On CPU this is much faster: XLA:CPU allocates a fresh temporary buffer
on every call, sized by the batch, and pays a page fault for every 4 KiB of it, while a
2-image batch's buffer is small and reused, and its feature maps stay in cache from one
layer to the next. On accelerators the whole per-device batch is one call
(``micro_batch=None``).

With one CPU device per core (:func:`use_cpu_device_per_core`, before JAX starts), each
core runs its own images without waiting for the other between kernels. On a single CPU
device the model itself micro-batches in eval mode (``eval_micro_batch``, see
``models/micro_batch.py``), so a plain ``jax.jit(model.apply)`` gets most of the gain;
this predictor with a device per core gains more on a 2-core CPU (docs/performance.md).
Larger machines are unmeasured.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

import jax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

try:
    from jax import shard_map
except ImportError:  # jax < 0.6
    from jax.experimental.shard_map import shard_map

from ca_flax.models.micro_batch import check_micro_batch, map_micro_batches, pad_rows
from ca_flax.mesh import DATA_AXIS, make_mesh

# Per-device micro-batch that micro_batch='auto' picks, by backend (None: the whole
# per-device batch in one call). CPU: 2 was the fastest of 1, 2, 4, 8 and 16 with a
# device per core (docs/performance.md).
_AUTO_MICRO_BATCH = {"cpu": 2}

Variables = Any
PredictFn = Callable[[Variables, jax.Array], Any]


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):  # Linux; not macOS or Windows
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def use_cpu_device_per_core(count: int | None = None) -> int:
    """Makes JAX's CPU backend expose ``count`` devices (default: the usable cores).

    Must run before JAX's first computation (the setting is read when the backend
    starts). A device count set by the user, through ``jax_num_cpu_devices`` or
    ``XLA_FLAGS=--xla_force_host_platform_device_count``, is kept. Returns the count
    that will be used. Only the CPU backend is affected; on a GPU or TPU host the
    accelerator devices are unchanged.
    """
    if count is not None and count < 1:
        raise ValueError(f"count={count}: a CPU backend needs at least one device.")
    forced = re.search(r"xla_force_host_platform_device_count[= ](\d+)", os.environ.get("XLA_FLAGS", ""))
    if forced:
        return int(forced.group(1))
    if jax.config.jax_num_cpu_devices > 0:
        return jax.config.jax_num_cpu_devices
    count = count or usable_cores()
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as error:
        raise RuntimeError(
            "use_cpu_device_per_core() must run before JAX's first computation (it sets jax_num_cpu_devices, "
            "which is read when the CPU backend starts); call it right after importing jax."
        ) from error
    return count


def resolve_micro_batch(micro_batch: int | str | None, backend: str | None = None) -> int | None:
    """The per-device micro-batch size ``'auto'`` stands for on ``backend`` (default: JAX's)."""
    if micro_batch == "auto":
        return _AUTO_MICRO_BATCH.get(backend or jax.default_backend())
    return check_micro_batch(micro_batch, "micro_batch")


def _in_micro_batches(apply: PredictFn, micro_batch: int | None) -> PredictFn:
    """``apply`` over the leading axis at most ``micro_batch`` rows at a time, sequentially
    (``models/micro_batch.map_micro_batches``: equal steps, the padding's outputs dropped)."""

    def run(variables, images):
        if micro_batch is None or images.shape[0] <= micro_batch:
            return apply(variables, images)
        return map_micro_batches(images, micro_batch, lambda chunks: lax.map(lambda c: apply(variables, c), chunks))

    return run


def predict_fn(
    model: Any, *, mesh: Mesh | None = None, micro_batch: int | str | None = "auto", **apply_kwargs: Any
) -> PredictFn:
    """``(variables, images) -> model.apply(variables, images, train=False)``, traceable.

    The batch is split over ``mesh``'s ``data`` axis (default: every device, as the
    trainer's mesh) and each device runs its rows ``micro_batch`` at a time. Any batch
    size works: rows are zero-padded (to a multiple of the device count, then on each
    device to equal steps of at most ``micro_batch``) and the padding's outputs dropped.
    ``variables`` are used replicated. Call it inside your own ``jax.jit`` (as the
    trainer's evaluation does) or use :func:`make_predictor`.

    Args:
      model: a Flax module whose ``__call__`` takes ``train``.
      mesh: a mesh with a ``data`` axis; ``None`` builds one over all devices.
      micro_batch: images per call on each device; ``None`` runs a device's whole share
        at once; ``'auto'`` picks per backend (2 on CPU, ``None`` on GPU and TPU).
      **apply_kwargs: passed on to ``model.apply`` (e.g. ``method=...``).
    """
    mesh = mesh if mesh is not None else make_mesh()
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"predict_fn needs a mesh with a {DATA_AXIS!r} axis; this one has {mesh.axis_names}.")
    backend = mesh.devices.flat[0].platform
    micro_batch = resolve_micro_batch(micro_batch, backend)
    devices = mesh.shape[DATA_AXIS]
    apply = _in_micro_batches(lambda v, x: model.apply(v, x, train=False, **apply_kwargs), micro_batch)
    sharded = shard_map(apply, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS)),
                        out_specs=PartitionSpec(DATA_AXIS))

    def predict(variables: Variables, images: jax.Array) -> Any:
        if images.ndim < 1 or images.shape[0] == 0:
            raise ValueError(f"predict needs a non-empty batch of images along axis 0; got shape {images.shape}.")
        rows = images.shape[0]
        if rows % devices == 0:  # each device pads its own rows: nothing moves between devices
            return sharded(variables, images)
        out = sharded(variables, pad_rows(images, -(-rows // devices) * devices))
        return jax.tree_util.tree_map(lambda y: y[:rows], out)

    return predict


def make_predictor(
    model: Any, *, mesh: Mesh | None = None, micro_batch: int | str | None = "auto", **apply_kwargs: Any
) -> PredictFn:
    """:func:`predict_fn` under ``jax.jit``, variables replicated and images split over
    ``mesh``'s ``data`` axis. One compilation per input shape."""
    mesh = mesh if mesh is not None else make_mesh()
    predict = predict_fn(model, mesh=mesh, micro_batch=micro_batch, **apply_kwargs)
    return jax.jit(predict, in_shardings=(NamedSharding(mesh, PartitionSpec()), None))
