"""Processes, devices and shardings: one ``data`` mesh axis, batch sharded, state replicated.

Shared by inference (``ca_flax.inference``, ``ca_flax.evaluate``) and training
(``ca_flax.training.parallel`` re-exports it); it imports neither.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# Environment variables by which JAX's own cluster detection recognizes a multi-process
# job (TPU pods, SLURM, Open MPI); jax.distributed.initialize() then needs no arguments.
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Starts ``jax.distributed`` when this is a multi-process run.

    Explicit flags win; otherwise JAX's cluster auto-detection is used where the
    environment names a cluster; a plain single-process run initializes nothing. On CPU
    the cross-process collectives go through gloo.
    """
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    detected = any(os.environ.get(k) for k in _CLUSTER_ENV) and int(os.environ.get("SLURM_NTASKS", "2")) > 1
    if not (explicit or detected):
        return
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise ValueError(
            "A multi-process run needs all of --coordinator_address, --num_processes and --process_id "
            f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d, %d devices in all", jax.process_index(),
                 jax.process_count(), jax.device_count())


def make_mesh() -> Mesh:
    """A 1-D mesh over every device of every process, grouped by process.

    Process ``p``'s devices hold the ``p``-th block of the batch axis, which is exactly
    the rows the input pipeline gives process ``p`` (rows ``[p * L, (p + 1) * L)`` of each
    global batch): the global batch is then the same for any number of processes.
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def stacked_data_sharding(mesh: Mesh) -> NamedSharding:
    """Several batches stacked on a new leading axis: that axis whole, the batch axis split."""
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state)."""
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles the global batch from every process's rows (each process passes its own)."""
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def check_batch_divisible(global_batch_size: int, what: str = "batch_size") -> None:
    """Fails early, with the fix, when the batch cannot be split evenly over devices."""
    devices, processes = jax.device_count(), jax.process_count()
    if global_batch_size % devices:
        raise ValueError(
            f"{what}={global_batch_size} is not divisible by the {devices} devices of the mesh; "
            f"use a multiple of {devices} (e.g. {max(devices, global_batch_size // devices * devices)})."
        )
    if global_batch_size % processes:
        raise ValueError(f"{what}={global_batch_size} is not divisible by the {processes} processes.")


def fetch(tree: Any) -> Any:
    """Device arrays to host numpy (replicated values are read from this process)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
