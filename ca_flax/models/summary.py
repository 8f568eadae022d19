"""Parameters and multiply-adds per layer, counted by XLA.

MAdds follow the convention of the MobileNet and CA papers: multiply-accumulates of
convolutions and linear layers, plus the products that apply an attention gate to a
feature map (the ops attention blocks put under the ``'gate'`` name scope). BatchNorm,
activations and pooling are not counted. Each convolution and matmul is costed by XLA's
own cost analysis (``flops / 2``) on its exact shapes, so nothing here re-derives conv
arithmetic by hand; the jaxpr's name stack says which layer each op belongs to.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import linen as nn

from ca_flax import fast_paths
from ca_flax.layers.gating import GATE_SCOPE

_MAC_PRIMITIVES = ("conv_general_dilated", "dot_general")


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One row of a model summary."""

    path: str
    module: str
    output_shape: tuple[int, ...] | None
    params: int
    madds: int


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """Per-layer rows and totals for one model at one input shape."""

    input_shape: tuple[int, ...]
    rows: list[LayerRow]

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def total_madds(self) -> int:
        return sum(r.madds for r in self.rows)

    def format(self) -> str:
        """The summary as a fixed-width text table."""
        shapes = ["x".join(map(str, r.output_shape)) if r.output_shape else "" for r in self.rows]
        w_path = max([len("layer")] + [len(r.path) for r in self.rows]) + 2
        w_mod = max([len("module")] + [len(r.module) for r in self.rows]) + 2
        w_shape = max([len("output shape")] + [len(x) for x in shapes]) + 2
        header = f"{'layer':<{w_path}}{'module':<{w_mod}}{'output shape':<{w_shape}}{'params':>12}{'MAdds':>16}"
        lines = [header, "-" * len(header)]
        for r, shape in zip(self.rows, shapes):
            lines.append(f"{r.path:<{w_path}}{r.module:<{w_mod}}{shape:<{w_shape}}{r.params:>12,}{r.madds:>16,}")
        lines.append("-" * len(header))
        lines.append(f"{'total':<{w_path + w_mod + w_shape}}{self.total_params:>12,}{self.total_madds:>16,}")
        lines.append(
            f"input {'x'.join(map(str, self.input_shape))}: {self.total_params / 1e6:.3f}M params, "
            f"{self.total_madds / 1e6:.1f}M MAdds (convolutions, linear layers and attention gate products)"
        )
        return "\n".join(lines)


_FLOPS_CACHE: dict[str, float] = {}


def _xla_flops(eqn: Any) -> float:
    """XLA's flop count for one equation's primitive on its operands' exact shapes."""
    avals = tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars)
    key = f"{eqn.primitive.name}{avals}{sorted(eqn.params.items(), key=lambda kv: kv[0])}"
    if key not in _FLOPS_CACHE:
        fn = jax.jit(lambda *xs: eqn.primitive.bind(*xs, **eqn.params))
        cost = fn.lower(*avals).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        _FLOPS_CACHE[key] = float(cost["flops"])
    return _FLOPS_CACHE[key]


def _equations(jaxpr: jax.extend.core.Jaxpr, outer: str = "") -> Iterator[tuple[Any, str]]:
    """Every equation with its full name stack, descending into sub-jaxprs (jit,
    custom_vjp, remat...), whose own name stacks are relative to the calling equation."""
    for eqn in jaxpr.eqns:
        stack = "/".join(p for p in (outer, str(eqn.source_info.name_stack)) if p)
        yield eqn, stack
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                # A ClosedJaxpr (jit, custom_vjp) wraps its Jaxpr; remat carries a bare Jaxpr.
                inner = sub if isinstance(sub, jax.extend.core.Jaxpr) else getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from _equations(getattr(inner, "jaxpr", inner), stack)


def _eqn_madds(eqn: Any, name_stack: str) -> int:
    name = eqn.primitive.name
    if name in _MAC_PRIMITIVES:
        return int(_xla_flops(eqn) // 2)
    if name == "mul" and f"/{GATE_SCOPE}" in f"/{name_stack}":
        return int(eqn.outvars[0].aval.size)
    return 0


def _layer_of(name_stack: str, depth: int) -> str:
    """``'MobileNetV2/MobileNetV2.features/blocks_3/attention/reduce'`` -> ``'blocks_3'``
    at depth 1 (method frames such as ``MobileNetV2.features`` are skipped)."""
    parts = [p for p in str(name_stack).split("/")[1:] if "." not in p and p != GATE_SCOPE]
    return "/".join(parts[:depth])


def summarize(model: nn.Module, input_shape: tuple[int, ...] = (1, 224, 224, 3), depth: int = 1) -> ModelSummary:
    """Parameters and MAdds of ``model`` per submodule (to ``depth`` levels) and in total.

    Nothing is compiled or executed: shapes come from ``jax.eval_shape`` and costs from
    XLA's analysis of the lowered convolutions and matmuls.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}.")
    # Plain modules: each depthwise convolution one XLA op, costed as a convolution (the
    # parameters and arithmetic are the same for every implementation), the whole batch
    # in one pass, no native kernels, so XLA's cost analysis sees every product.
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    with fast_paths.disabled():
        variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x)
        calls = _record_calls(model, variables, x, depth)
        jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=False))(variables, x)

    madds: dict[str, int] = defaultdict(int)
    for eqn, name_stack in _equations(jaxpr.jaxpr):
        cost = _eqn_madds(eqn, name_stack)
        if cost:
            madds[_layer_of(name_stack, depth)] += cost

    params: dict[str, int] = defaultdict(int)
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(variables.get("params", {}))[0]:
        keys = [k.key for k in key_path][:-1]  # drop the variable name
        params["/".join(keys[:depth])] += leaf.size

    rows = [
        LayerRow(path, module, shape, params.pop(path, 0), madds.pop(path, 0))
        for path, (module, shape) in calls.items()
    ]
    # Parameters or products outside any submodule, if a model has them.
    if any(params.values()) or any(madds.values()):
        rows.append(LayerRow("(top level)", type(model).__name__, None, sum(params.values()), sum(madds.values())))
    return ModelSummary(tuple(input_shape), rows)


def _record_calls(
    model: nn.Module, variables: Any, x: jax.ShapeDtypeStruct, depth: int
) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """``{path: (module class, output shape)}`` of the submodules ``depth`` levels down,
    in call order, recorded by intercepting their ``__call__`` under ``eval_shape``."""
    calls: dict[str, tuple[str, tuple[int, ...] | None]] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = context.module.path
        if context.method_name == "__call__" and 1 <= len(path) <= depth:
            leaves = jax.tree_util.tree_leaves(out)
            calls.setdefault("/".join(path), (type(context.module).__name__, tuple(leaves[0].shape) if leaves else None))
        return out

    def run(variables, x):
        with nn.intercept_methods(interceptor):
            return model.apply(variables, x, train=False)

    jax.eval_shape(run, variables, x)
    # Calls are recorded as they return (children before parents), so the leaves of the
    # recorded tree are already in call order.
    return {k: v for k, v in calls.items() if not any(other.startswith(k + "/") for other in calls)}
