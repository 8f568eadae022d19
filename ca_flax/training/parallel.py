"""The trainer's processes, devices and shardings: :mod:`ca_flax.mesh`, re-exported here
for the code that imported them from this module."""

from ca_flax.mesh import (
    DATA_AXIS,
    check_batch_divisible,
    data_sharding,
    fetch,
    global_batch,
    initialize_distributed,
    make_mesh,
    replicated,
    stacked_data_sharding,
)

__all__ = [
    "DATA_AXIS",
    "check_batch_divisible",
    "data_sharding",
    "fetch",
    "global_batch",
    "initialize_distributed",
    "make_mesh",
    "replicated",
    "stacked_data_sharding",
]
