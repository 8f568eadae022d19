"""Named model variants: ``create_model('mobilenetv2_ca', width_mult=0.5)``.

Each entry is a function returning the module's default settings; ``create_model`` lays
the caller's overrides on top and builds the module. No import-time magic beyond the
``@register_model`` decorator on each variant function.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Callable

from flax import linen as nn

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, tuple[ModelFactory, dict[str, Any], str]] = {}


def register_model(name: str, factory: ModelFactory, doc: str, **defaults: Any) -> None:
    """Registers ``factory(**defaults, **overrides)`` under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"Model {name!r} is already registered.")
    _REGISTRY[name] = (factory, defaults, doc)


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally only those containing ``pattern``."""
    return sorted(n for n in _REGISTRY if pattern is None or pattern in n)


def model_defaults(name: str) -> dict[str, Any]:
    """The settings ``name`` is built with when no override is given."""
    return dict(_lookup(name)[1])


def model_options(name: str) -> list[str]:
    """Sorted names of the settings ``create_model(name, ...)`` takes: the module's fields
    (but ``parent`` and ``name``), or the factory function's keyword parameters."""
    factory = _lookup(name)[0]
    if isinstance(factory, type) and dataclasses.is_dataclass(factory):
        return sorted(f.name for f in dataclasses.fields(factory) if f.init and f.name not in ("parent", "name"))
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return sorted(p.name for p in inspect.signature(factory).parameters.values() if p.kind in kinds)


def architectures() -> dict[str, type[nn.Module]]:
    """``{class name: class}`` of every registered factory that is a Module class: the
    architectures a checkpoint's ``"architecture"`` field can name."""
    found: dict[str, type[nn.Module]] = {}
    for name, (factory, _, _) in _REGISTRY.items():
        if not (isinstance(factory, type) and issubclass(factory, nn.Module)):
            continue
        other = found.setdefault(factory.__name__, factory)
        if other is not factory:  # checkpoints name the class: two of one name would be ambiguous
            raise ValueError(f"Model {name!r} registers a second class named {factory.__name__!r} "
                             f"({factory.__module__} and {other.__module__}); rename one.")
    return found


def describe_model(name: str) -> str:
    """One line on what the named variant is."""
    return _lookup(name)[2]


def _lookup(name: str) -> tuple[ModelFactory, dict[str, Any], str]:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown model {name!r}.{hint} Known models: {', '.join(list_models())}.") from None


def create_model(name: str, *, num_classes: int = 1000, width_mult: float | None = None, **overrides: Any) -> nn.Module:
    """Builds the registered model ``name`` as a Flax Linen module.

    Args:
      name: one of :func:`list_models`.
      num_classes: classifier outputs.
      width_mult: channel multiplier; ``None`` keeps the variant's own (1.0 for the
        ``mobilenetv2*`` family names, 1.4 for ``mobilenetv2_140``, ...).
      **overrides: any other module attribute (``attention``, ``dropout_rate``,
        ``stage_repeats``, ``depthwise_impl``, ``dtype``, ...).

    ``model.init(rng, x, train=False)`` returns ``{'params', 'batch_stats'}`` and
    ``model.apply(variables, x, train=False)`` the logits.
    """
    factory, defaults, _ = _lookup(name)
    kwargs = {**defaults, "num_classes": num_classes, **overrides}
    if width_mult is not None:
        kwargs["width_mult"] = width_mult
    return factory(**kwargs)
