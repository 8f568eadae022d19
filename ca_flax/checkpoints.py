"""The ca-flax model checkpoint: a directory with the model's configuration and variables.

Layout::

    DST/
      model.json    {"format": "ca-flax-model", "version": 1, "architecture": "MobileNetV2",
                     "config": {...module fields...}, "source": {...provenance...}}
      variables/    {'params', 'batch_stats'} saved with orbax-checkpoint

>>> save_model('ckpt/mbv2_ca', model, variables, source={'from': 'mbv2_ca.pth'})
>>> model, variables = load_model('ckpt/mbv2_ca')

A training workdir (``model.json`` + orbax ``checkpoints/<step>/``) reads the same way
through :func:`restore`, which also returns the step; an unreadable newest step is
skipped with a :class:`CheckpointWarning` (the workdir is never changed), and variables
that do not fit the recorded model are refused (docs/workdir.md).

Saving is atomic: everything is written into a temporary sibling directory that is
renamed to ``DST`` only when complete, so an interrupted save never leaves a ``DST``
that looks valid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
import secrets
import shutil
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

import ca_flax.models  # noqa: F401 - registers the model families
from ca_flax.models.registry import architectures

FORMAT = "ca-flax-model"
VERSION = 1
METADATA_FILE = "model.json"
VARIABLES_DIR = "variables"
# A training workdir keeps orbax checkpoints WORKDIR/checkpoints/<step>/{state,meta};
# the best one has the highest meta["metrics"][BEST_METRIC].
TRAINING_DIR = "checkpoints"
BEST_METRIC = "eval_top1"
# Module fields that are runtime choices, not part of the model: a checkpoint does not
# record them and they stay at their defaults on load. A family's module class declares
# its own as the ClassVar ``runtime_fields``; this is the default for one that does not.
DEFAULT_RUNTIME_FIELDS = ("depthwise_impl", "eval_micro_batch", "dtype", "param_dtype")

Variables = Mapping[str, Any]
T = TypeVar("T")


class CheckpointError(ValueError):
    """A model checkpoint cannot be written or read; the message names the path."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint that reads but does not fit what it is restored into: every step of
    it would fail alike, so it is refused rather than skipped as damaged."""


class CheckpointWarning(UserWarning):
    """An unreadable checkpoint step was skipped in favour of an older one."""


def config_fields(cls: type[nn.Module]) -> tuple[str, ...]:
    """The fields of module class ``cls`` a checkpoint records, in declaration order: its
    init fields but ``parent``, ``name`` and its ``runtime_fields``."""
    runtime = set(getattr(cls, "runtime_fields", DEFAULT_RUNTIME_FIELDS))
    return tuple(f.name for f in dataclasses.fields(cls)
                 if f.init and f.name not in ("parent", "name") and f.name not in runtime)


def model_config(model: nn.Module) -> dict[str, Any]:
    """The JSON-serializable configuration of ``model`` (see :func:`config_fields`):
    sequences become lists and mappings dicts; a callable is refused (it has no name
    to save)."""
    architecture_name(model)
    config = {name: _to_json(name, getattr(model, name)) for name in config_fields(type(model))}
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"The model configuration is not JSON-serializable: {error}.") from None
    return config


def _to_json(name: str, value: Any) -> Any:
    """``value`` of field ``name`` in JSON's types, by the value's type."""
    if isinstance(value, (str, bool, int, float, type(None))):
        return value
    if isinstance(value, np.generic):  # a numpy scalar
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_to_json(name, v) for v in value]
    if isinstance(value, Mapping) or callable(getattr(value, "items", None)):  # ml_collections' ConfigDict too
        return {k: _to_json(name, v) for k, v in value.items()}
    if callable(value):
        raise CheckpointError(
            f"Cannot save a model whose {name} is a callable ({value!r}); use a named {name}."
        )
    return value  # json.dumps in model_config names what does not serialize


def _from_json(value: Any) -> Any:
    """The inverse of :func:`_to_json`: lists become tuples (module fields are hashable)."""
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    return value


def model_from_config(config: Mapping[str, Any], architecture: str = "MobileNetV2") -> nn.Module:
    """Builds the module a :func:`model_config` dict describes."""
    known = architectures()
    if architecture not in known:
        raise CheckpointError(f"Unknown architecture {architecture!r}; known: {', '.join(known)}.")
    cls = known[architecture]
    fields = config_fields(cls)
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise CheckpointError(f"Unknown configuration fields {unknown}; known: {', '.join(fields)}.")
    try:
        return cls(**{name: _from_json(value) for name, value in config.items()})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"Invalid model configuration: {error}") from None


def model_metadata(model: nn.Module, source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The contents of ``model.json`` for ``model`` with provenance ``source``."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "architecture": architecture_name(model),
        "config": model_config(model),
        "source": dict(source) if source is not None else None,
    }


_SHAPES_CACHE: OrderedDict[str, dict[str, Any]] = OrderedDict()


def abstract_variables(model: nn.Module) -> dict[str, Any]:
    """The variables ``model.init`` would create, as ``jax.ShapeDtypeStruct`` (no compute).

    Tracing a network takes about a second, and a conversion asks for the same model's
    shapes several times, so recent results are kept (keyed by the module's repr, which
    lists every attribute); each call returns fresh containers.
    """
    key = repr(model)
    if key not in _SHAPES_CACHE:
        x = jax.ShapeDtypeStruct((1, 32, 32, getattr(model, "in_channels", 3)), jnp.float32)
        init = functools.partial(model.init, train=False)
        _SHAPES_CACHE[key] = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), dict(jax.eval_shape(init, jax.random.key(0), x))
        )
        if len(_SHAPES_CACHE) > 16:
            _SHAPES_CACHE.popitem(last=False)
    return jax.tree_util.tree_map(lambda a: a, _SHAPES_CACHE[key])


def variables_mismatch(expected: Variables, given: Variables, *, dtypes: bool = False) -> list[str]:
    """Differences between two variable trees, one line each: missing and unexpected
    paths (``params/stem/conv/kernel``), shapes and, with ``dtypes``, dtypes.

    The trees are nested dicts, or dicts already flat with ``/``-joined keys. A
    ``ShapeDtypeStruct`` in ``given`` is missing: it is what a partial restore leaves
    where the checkpoint has no array.
    """
    expected = traverse_util.flatten_dict(dict(expected), sep="/")
    given = traverse_util.flatten_dict(dict(given), sep="/")
    absent = {p for p, leaf in given.items() if isinstance(leaf, jax.ShapeDtypeStruct)}
    problems = [f"missing {p}" for p in expected if p not in given or p in absent]
    problems += [f"unexpected {p}" for p in given if p not in expected]
    for p in expected:
        if p not in given or p in absent:
            continue
        if tuple(given[p].shape) != tuple(expected[p].shape):
            problems.append(f"{p}: shape {tuple(given[p].shape)}, expected {tuple(expected[p].shape)}")
        elif dtypes and jnp.dtype(given[p].dtype) != jnp.dtype(expected[p].dtype):
            problems.append(f"{p}: dtype {jnp.dtype(given[p].dtype)}, expected {jnp.dtype(expected[p].dtype)}")
    return problems


def summarize(problems: Sequence[str], shown: int = 3) -> str:
    """The first ``shown`` of :func:`variables_mismatch`'s lines and how many more there are."""
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


def architecture_name(model: nn.Module) -> str:
    """The name ``model.json`` records for ``model``'s class (a registered family's)."""
    for name, cls in architectures().items():
        if type(model) is cls:
            return name
    raise CheckpointError(f"Cannot save a {type(model).__name__}; supported: {', '.join(architectures())}.")


def save_model(
    path: str | os.PathLike[str],
    model: nn.Module,
    variables: Variables,
    *,
    source: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Saves ``model`` (its configuration) and ``variables`` as a checkpoint directory.

    Args:
      path: the directory to create.
      model: a module of a known architecture with a named activation.
      variables: ``{'params', 'batch_stats'}`` matching ``model`` (checked).
      source: JSON-serializable provenance (original file, converter notes, ...).
      overwrite: replace an existing ``path``; otherwise an existing path is an error.

    Returns the checkpoint path. Raises :class:`CheckpointError` on bad input.
    """
    path = Path(path).absolute()
    metadata = model_metadata(model, source)
    try:
        text = json.dumps(metadata, indent=2, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: the source provenance is not JSON-serializable: {error}.") from None
    problems = variables_mismatch(abstract_variables(model), variables)
    if problems:
        raise CheckpointError(f"{path}: the variables do not match the model: {'; '.join(problems[:8])}.")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()  # unlike tempfile.mkdtemp, honours the umask (mkdtemp makes it 0700)
    try:
        (tmp / METADATA_FILE).write_text(text + "\n")
        _save_variables(tmp / VARIABLES_DIR, variables)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _save_variables(path: Path, variables: Variables) -> None:
    import orbax.checkpoint as ocp  # slow to import: only when saving or loading

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, dict(variables))


def _replace_dir(tmp: Path, path: Path) -> None:
    """Renames ``tmp`` to ``path``; an existing ``path`` is moved aside first and deleted
    after, so ``path`` is never a mix of the old and the new checkpoint."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{secrets.token_hex(6)}"
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed and validated ``model.json`` of the checkpoint at ``path``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory.")
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: is a file, not a ca-flax checkpoint directory. PyTorch weights are converted with "
            "`python -m ca_flax.convert SRC DST`."
        )
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a ca-flax model checkpoint: it has no {METADATA_FILE}.")
    try:
        metadata = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{meta_path}: not valid JSON ({error}).") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ca-flax model checkpoint ({METADATA_FILE} lacks \"format\": \"{FORMAT}\").")
    version = metadata.get("version")
    if version != VERSION:
        newer = isinstance(version, int) and version > VERSION
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r}, this ca-flax reads version {VERSION}"
            f"{'; it was written by a newer ca-flax, upgrade to read it' if newer else ''}."
        )
    if not isinstance(metadata.get("config"), dict):
        raise CheckpointError(f"{path}: {METADATA_FILE} has no \"config\" object.")
    return metadata


def load_model(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Loads a checkpoint written by :func:`save_model`: ``(model, variables)``.

    The variables are restored into the structure the configuration implies, so a
    checkpoint whose variables do not fit its configuration is refused. A training
    workdir loads too (its latest step; see :func:`restore`).
    """
    model, variables, _ = restore(path)
    return model, variables


def restore(path: str | os.PathLike[str], *, which: str = "latest") -> tuple[nn.Module, dict[str, Any], int]:
    """``(model, variables, step)`` from a model checkpoint or a training workdir.

    A model checkpoint (``model.json`` + ``variables/``) is step 0. A training workdir
    (``model.json`` + ``checkpoints/<step>/{state,meta}``) gives its ``'latest'`` step or
    its ``'best'`` one (highest ``eval_top1``); only the parameters and BatchNorm
    statistics are read, not the optimizer state. A step that cannot be read is skipped
    for the next older (or next best) one with a :class:`CheckpointWarning`; nothing is
    changed on disk (a training run may hold the workdir). Variables that do not fit the
    model ``model.json`` describes raise :class:`CheckpointMismatchError`.
    """
    if which not in ("latest", "best"):
        raise CheckpointError(f"which must be 'latest' or 'best', got {which!r}.")
    path = Path(path).absolute()
    metadata = read_metadata(path)
    try:
        model = model_from_config(metadata["config"], metadata.get("architecture", "MobileNetV2"))
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    abstract = abstract_variables(model)
    import orbax.checkpoint as ocp  # slow to import: only when loading

    try:
        if (path / VARIABLES_DIR).is_dir():
            with _abandoned_reads.reading(path), ocp.StandardCheckpointer() as checkpointer:
                variables = dict(checkpointer.restore(path / VARIABLES_DIR, abstract))
            _check_fits(path, 0, abstract, variables)
            return model, variables, 0
        if (path / TRAINING_DIR).is_dir():
            return (model, *_restore_training_step(path / TRAINING_DIR, abstract, which))
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, FileNotFoundError) as error:
        message = str(error).strip().splitlines()
        raise CheckpointError(
            f"{path}: the saved variables cannot be restored for the recorded configuration "
            f"({message[0] if message else type(error).__name__})."
        ) from None
    raise CheckpointError(
        f"{path}: has neither {VARIABLES_DIR}/ (a model checkpoint) nor {TRAINING_DIR}/ (a training "
        "workdir); it is incomplete."
    )


def _check_fits(path: Path, step: int, abstract: Variables, variables: Variables, dtypes: bool = True) -> None:
    """Refuses ``variables`` (restored, or a step's stored metadata) that do not fit
    ``abstract``: a partial restore would otherwise hand back the wrong shapes, or
    ``ShapeDtypeStruct`` placeholders where the checkpoint lacks an array. Stored dtypes
    may differ (``dtypes=False``): a restore casts to ``abstract``'s."""
    problems = variables_mismatch(abstract, variables, dtypes=dtypes)
    if problems:
        raise CheckpointMismatchError(
            f"{path}: the variables saved at step {step} do not fit the model its {METADATA_FILE} describes: "
            f"{summarize(problems)}. {METADATA_FILE} and the checkpoint come from different models; "
            f"restore the {METADATA_FILE} that was written with them."
        )


def _restore_training_step(directory: Path, abstract: dict[str, Any], which: str) -> tuple[dict[str, Any], int]:
    """Parameters and statistics of one step of a training run's orbax checkpoints."""
    import orbax.checkpoint as ocp

    # A PyTree handler reads the StandardSave'd state partially (not the optimizer state).
    manager = ocp.CheckpointManager(
        directory, item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"{directory}: no complete training checkpoint.")
        if which == "best":
            metric = {s: _step_metric(manager, s) for s in steps}
            steps = sorted((s for s in steps if metric[s] is not None), key=lambda s: (metric[s], s), reverse=True)
            if not steps:
                raise CheckpointError(f"{directory}: no evaluated checkpoint, so no best one; use which='latest'.")

        def read(step: int) -> dict[str, Any]:
            stored = manager.item_metadata(step)["state"]
            if stored is not None:  # checked before reading: a mismatch is not damage
                stored = {name: stored.tree.get(name, {}) for name in abstract}
                _check_fits(directory.parent, step, abstract, stored, dtypes=False)
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
            state = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
            restored = manager.restore(step, args=ocp.args.Composite(state=state))["state"]
            variables = {name: restored[name] for name in abstract}
            _check_fits(directory.parent, step, abstract, variables)
            return variables

        step, variables, damaged = read_newest_intact(directory, steps, read)
    finally:
        manager.close()
    if damaged:
        warnings.warn(CheckpointWarning(
            f"{directory}: skipped unreadable {_describe_damaged(damaged)}; read step {step} instead."
        ), stacklevel=3)
    return variables, int(step)


def _step_metric(manager: Any, step: int) -> float | None:
    """The step's ``eval_top1``; None when it was not evaluated or its metadata is unreadable."""
    import orbax.checkpoint as ocp

    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception:  # noqa: BLE001 - a damaged step is no candidate for the best one
        return None
    return dict(meta).get("metrics", {}).get(BEST_METRIC)


def read_newest_intact(directory: Path, steps: Sequence[int], read: Callable[[int], T]) -> tuple[int, T, list[tuple[int, str]]]:
    """``(step, read(step), damaged)`` for the first of ``steps`` (newest first) that
    reads; ``damaged`` lists ``(step, what went wrong)`` for each one before it.

    Anything ``read`` raises counts as damage except :class:`CheckpointMismatchError`,
    which every step would raise alike and so propagates. When no step reads, raises
    :class:`CheckpointError` listing them all: then the cause may as well be this
    machine (memory, a file system), so nothing is to be set aside.
    """
    damaged: list[tuple[int, str]] = []
    for step in steps:
        try:
            with _abandoned_reads.reading(directory / str(step)):
                return step, read(step), damaged
        except CheckpointMismatchError:
            raise
        except Exception as error:  # noqa: BLE001 - TensorStore, JSON and OS errors alike
            first = (str(error).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
            damaged.append((step, f"{type(error).__name__}: {first[:300]}"))
    raise CheckpointError(
        f"{directory}: none of its {len(steps)} checkpoints can be read: {_describe_damaged(damaged)}. "
        "If they are damaged, move them aside (or use another --workdir) to start over; nothing was changed."
    )


def _describe_damaged(damaged: Sequence[tuple[int, str]]) -> str:
    return "; ".join(f"step {step} ({reason})" for step, reason in damaged)


class _AbandonedReads:
    """Keeps the reports of failed orbax reads off the console. A failed read abandons
    one coroutine, task or TensorStore future per array, and each reports its own copy of
    the error with a TensorStore spec when it is collected or completes, even after the
    exception that failed the read was handled: hundreds of lines for one damaged file.
    While a read runs every such report is dropped; afterwards, those that name a
    checkpoint whose read failed (and the "Event loop is closed" of their late callbacks)."""

    def __init__(self) -> None:
        self.failed: set[str] = set()

    def dropped(self, text: str) -> bool:
        return bool(self.failed) and ("Event loop is closed" in text or any(p in text for p in self.failed))

    @contextlib.contextmanager
    def reading(self, path: Path) -> Iterator[None]:
        previous, asyncio_log = sys.unraisablehook, logging.getLogger("asyncio")
        sys.unraisablehook, asyncio_log.disabled = (lambda unraisable: None), True
        failed = True
        try:
            yield
            failed = False
        finally:
            gc.collect()  # the abandoned coroutines and tasks report when collected: here
            sys.unraisablehook, asyncio_log.disabled = previous, False
            if failed:
                self._drop_later(f"{path}{os.sep}")

    def _drop_later(self, path: str) -> None:
        if not self.failed:  # the first failure installs the filters
            logging.getLogger("asyncio").addFilter(
                lambda record: not self.dropped(f"{record.getMessage()} {record.exc_info and record.exc_info[1]}"))
            previous = sys.unraisablehook
            sys.unraisablehook = lambda u: None if self.dropped(f"{u.exc_value} {u.object}") else previous(u)
        self.failed.add(path)


_abandoned_reads = _AbandonedReads()
