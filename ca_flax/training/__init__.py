"""The trainer behind ``train.py``: state, optimizer, steps, sharding, checkpoints, metrics.

Modules: ``state`` (the train state), ``optim`` (optimizer and schedule), ``steps``
(pure train/eval steps, k steps as one scan), ``parallel`` (mesh, shardings,
``jax.distributed``), ``checkpointing`` (Orbax), ``metrics`` (console, metrics.jsonl,
TensorBoard), ``workdir`` (the workdir's lock and model check), ``trainer`` (the loop),
``cli`` (``train.py``'s command line).

Needs the ``train`` extra (``pip install 'ca-flax[train]'``): importing this package
without it raises an ImportError that says so and names the missing packages.
"""

from ca_flax._extras import require

require("ca_flax.training", "train")
