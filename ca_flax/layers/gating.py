"""Applying an attention block's gates to its feature map."""

from __future__ import annotations

import jax

from ca_flax.layers.recompute import recompute_in_backward

# Name scope of the gate products: the model summary counts them as multiply-adds, as
# the paper's MAdds figures do.
GATE_SCOPE = "gate"


def _product(x: jax.Array, *gates: jax.Array) -> jax.Array:
    for gate in gates:  # in the released code's order, so rounding matches it
        x = x * gate
    return x


# With two gates or more the partial products are recomputed in the backward pass from
# the inputs: stored, each would be one more feature map per block.
_recomputed_product = recompute_in_backward(_product)


def apply_gates(x: jax.Array, *gates: jax.Array) -> jax.Array:
    """``x * gates[0] * gates[1] ...``, each gate broadcast against the map ``x``."""
    with jax.named_scope(GATE_SCOPE):
        return _recomputed_product(x, *gates) if len(gates) > 1 else _product(x, *gates)


__all__ = ["GATE_SCOPE", "apply_gates"]
