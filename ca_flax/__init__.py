"""ca-flax: Coordinate Attention and the mobile networks built on it (MobileNetV2, MobileNeXt) in JAX/Flax.

Subpackages: ``layers`` (building blocks), ``attention`` (CA, SE, CBAM), ``models``
(networks and the registry), ``convert`` (PyTorch weights), ``data`` (input pipeline),
``training`` (the trainer behind ``train.py``).

``pip install ca-flax`` installs the library (JAX, Flax, Optax, Orbax, NumPy, safetensors):
``models``, ``attention``, ``layers``, ``checkpoints``, ``inference``, ``native`` and
``convert`` (for ``.safetensors``/``.npz``). The rest needs an extra: ``[train]`` for
``training``, ``data``, ``evaluate`` and ``train.py``; ``[viz]`` for ``predict`` and
``visualize``; ``[export]`` for ``export``; ``[torch]`` to read ``.pth`` files. A module
used without its extra raises an ImportError that names it (``ca_flax._extras``).
"""

__version__ = "0.1.0"
