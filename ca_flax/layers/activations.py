"""Activation functions by name, so configs and model variants can pick them as strings."""

from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array]
ActivationLike = Union[str, Activation, None]


def relu6(x: jax.Array) -> jax.Array:
    """min(max(x, 0), 6), as torch.nn.ReLU6, gradient included: ``lax.clamp`` passes
    the gradient only strictly inside (0, 6), as PyTorch's hardtanh backward does
    (``jnp.clip`` would pass half of it at exactly 0 or 6). NaN stays NaN, as in PyTorch
    (XLA's clamp propagates it; tests/test_layers.py checks)."""
    return jax.lax.clamp(jnp.zeros((), x.dtype), x, jnp.full((), 6, x.dtype))


def hard_swish(x: jax.Array) -> jax.Array:
    """x * relu6(x + 3) / 6: the released CA block's ``h_swish``, bit for bit.

    Written out rather than ``jax.nn.hard_swish`` (which multiplies by
    ``relu6(x + 3) / 6`` in another order) so float rounding follows the PyTorch code.
    """
    return x * relu6(x + 3.0) / 6.0


def hard_sigmoid(x: jax.Array) -> jax.Array:
    """relu6(x + 3) / 6, as the released code's ``h_sigmoid``."""
    return relu6(x + 3.0) / 6.0


_ACTIVATIONS: dict[str, Activation] = {
    "relu": jax.nn.relu,
    "relu6": relu6,
    "hard_swish": hard_swish,
    "h_swish": hard_swish,
    "swish": jax.nn.swish,
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "sigmoid": jax.nn.sigmoid,
    "hard_sigmoid": hard_sigmoid,
    "h_sigmoid": hard_sigmoid,
    "identity": lambda x: x,
}


def get_activation(activation: ActivationLike) -> Activation:
    """Returns the activation for a name (``'relu6'``, ``'hard_swish'``, ...), a callable
    (returned unchanged) or ``None`` (identity)."""
    if activation is None:
        return _ACTIVATIONS["identity"]
    if callable(activation):
        return activation
    if isinstance(activation, str) and activation in _ACTIVATIONS:
        return _ACTIVATIONS[activation]
    raise ValueError(f"Unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)} or pass a callable.")


def list_activations() -> list[str]:
    """Names accepted by :func:`get_activation`."""
    return sorted(_ACTIVATIONS)
