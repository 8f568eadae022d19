"""ca-flax: Coordinate Attention and the MobileNetV2 family in JAX/Flax.

Subpackages: ``layers`` (building blocks), ``attention`` (CA, SE, CBAM), ``models``
(networks and the registry), ``convert`` (PyTorch weights), ``data`` (input pipeline),
``training`` (the trainer behind ``train.py``).
"""

__version__ = "0.1.0"
