"""The training workdir's guards (docs/workdir.md): one run at a time, and a rerun either
continues the run that wrote the workdir or changes nothing.

- ``WORKDIR/.lock`` is ``flock``-ed by the process that writes the workdir (process 0
  of a multi-process run) while it trains. The kernel releases it when the process
  ends, however it ends (SIGKILL included), so a crashed run never leaves it stuck. It
  names its holder while held and is emptied on release, so a refused run leaves every
  file of the workdir as it was.
- ``WORKDIR/model.json`` must describe the model a rerun builds: a run that would load
  the checkpoints into another model is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping

from ca_flax.checkpoints import METADATA_FILE, TRAINING_DIR, architecture_name, model_config, read_metadata

LOCK_FILE = ".lock"


@contextlib.contextmanager
def hold(workdir: Path) -> Iterator[None]:
    """Holds ``workdir``'s lock while the block runs (creating the workdir); raises
    ValueError, naming the holder, when another process holds it."""
    path = workdir / LOCK_FILE
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise ValueError(f"Cannot create the lock file {path}: {error.strerror}; use a writable --workdir.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "its pid not yet written"
            raise ValueError(
                f"{workdir} is in use by another training run ({holder}); two runs in one workdir delete each "
                "other's checkpoints. Wait for it to end (or stop it), or use another --workdir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # nobody holds it now; unlocking is closing
    finally:
        os.close(fd)


def has_checkpoints(workdir: Path) -> bool:
    """Whether ``workdir`` holds a finished checkpoint step (orbax names them by number)."""
    directory = workdir / TRAINING_DIR
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_model(workdir: Path, model: Any, config: Any) -> None:
    """Refuses (ValueError) a run whose model differs from the one ``workdir``'s
    checkpoints were trained with; a workdir without checkpoints fits any model."""
    if not has_checkpoints(workdir) or not (workdir / METADATA_FILE).exists():
        return
    saved = read_metadata(workdir)
    # Through JSON, as model.json holds it (tuples become lists).
    ours = {"architecture": architecture_name(model), **json.loads(json.dumps(model_config(model)))}
    theirs = {"architecture": saved.get("architecture", "MobileNetV2"), **saved["config"]}
    changed = differences(theirs, ours)
    if not changed:
        return
    source = saved.get("source") or {}
    flags = {_flag(field, theirs.get(field), source) for field in changed}
    if "attention" in changed:  # the model name brings its attention's settings
        flags.discard(_flag("attention_kwargs", theirs.get("attention_kwargs"), source))
    raise ValueError(
        f"{workdir} holds checkpoints of another model than this run's ({METADATA_FILE}: "
        f"{source.get('model', theirs['architecture'])} there, {config.model} in this run; {describe(changed)}). "
        "Resuming would load its variables into a model they do not fit, so nothing was changed. Train this "
        f"model in another --workdir, or rerun with the workdir's settings: {' '.join(sorted(flags))}."
    )


def differences(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (theirs, ours)}`` for each field whose value differs (absent is None)."""
    return {k: (theirs.get(k), ours.get(k)) for k in sorted({*theirs, *ours}) if theirs.get(k) != ours.get(k)}


def describe(changed: Mapping[str, tuple[Any, Any]]) -> str:
    """"width_mult 0.35 there, 0.5 in this run; ..." for :func:`differences`' result."""
    show = lambda v: "unset" if v is None else json.dumps(v)  # noqa: E731
    return "; ".join(f"{k} {show(a)} there, {show(b)} in this run" for k, (a, b) in changed.items())


def _flag(field: str, value: Any, source: Mapping[str, Any]) -> str:
    """The train.py flag that sets the model field ``field`` back to ``value``."""
    if field in ("attention", "architecture") and source.get("model"):
        return f"--config.model={source['model']}"
    if field == "num_classes" and source.get("dataset"):
        return f"--config.dataset={source['dataset']}"
    return f"--config.model_kwargs.{field}={json.dumps(value)}"
