"""Compiles the package's C++ CPU kernels on first use, caches them, loads them.

The kernels are XLA FFI handlers (``jax.ffi``): plain C++ against the headers jaxlib
ships (``jax.ffi.include_dir()``), built with the system's C++ compiler (``$CXX``, else
``c++``) for this machine's CPU (``-march=native``) the first time a process needs them,
as ``torch.utils.cpp_extension.load`` and Triton do. The shared library goes to a cache
directory (``$CA_FLAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/ca_flax``, else
``~/.cache/ca_flax``) under a name that hashes the source (with the package's headers),
the flags, the compiler's version, jaxlib's version and the CPU's feature flags, so a
changed source, toolchain or machine builds afresh. It is written under a temporary name and renamed into place, so a
build that fails or is killed never leaves a file that looks valid; processes building at
once each rename a complete file.

Nothing here is required: with no compiler, a failed build or ``CA_FLAX_NATIVE=0`` the
callers use their XLA formulation (a build failure warns, with the compiler's message
and how to silence it: once per process for a cause that fails every kernel alike, such
as a missing compiler).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator

import jax
import jaxlib

from ca_flax import fast_paths

SOURCE_DIR = Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
DISABLE_ENV = "CA_FLAX_NATIVE"

_lock = threading.Lock()
_targets: dict[tuple[str, str], str | None] = {}  # (source, symbol) -> FFI target or None
_failures: set[str] = set()  # build failures already warned about, by cause


class NativeBuildError(RuntimeError):
    """The C++ compiler is missing or failed; the message says which and how to fix it."""


_disabled_here: contextvars.ContextVar[bool] = contextvars.ContextVar("ca_flax_native_disabled", default=False)


def enabled() -> bool:
    """False when ``CA_FLAX_NATIVE=0`` (or ``false``/``no``/``off``) turns the kernels off,
    inside :func:`disabled`, or inside ``ca_flax.fast_paths.disabled()``."""
    if _disabled_here.get() or not fast_paths.enabled():
        return False
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Functions traced inside this block use the XLA formulations of the kernels (the
    other fast paths stay on; ``ca_flax.fast_paths.disabled()`` turns all of them off).
    Like ``CA_FLAX_NATIVE=0``, it acts when a function is traced: a function ``jax.jit``
    already traced keeps its program."""
    token = _disabled_here.set(True)
    try:
        yield
    finally:
        _disabled_here.reset(token)


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("CA_FLAX_CACHE_DIR"):
        return Path(os.environ["CA_FLAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ca_flax"


def _compiler() -> str:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise NativeBuildError(
            f"No C++ compiler {compiler!r} on PATH: install one (e.g. g++) or point $CXX at it, "
            f"or set {DISABLE_ENV}=0 to use the XLA formulation without this message."
        )
    return compiler


def _cpu_flags() -> str:
    """The CPU's feature flags (what ``-march=native`` compiles for), '' where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _build_key(source: Path, compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256()
    headers = b"".join(header.read_bytes() for header in sorted(SOURCE_DIR.glob("*.h")))
    for part in (source.read_bytes(), headers, " ".join(FLAGS).encode(), version.encode(),
                 jaxlib.__version__.encode(), _cpu_flags().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build(name: str) -> Path:
    """Path of the shared library built from ``<name>.cc``, compiling it if not cached.

    Raises:
      NativeBuildError: no compiler, or the compile failed (its output in the message).
    """
    source = SOURCE_DIR / f"{name}.cc"
    compiler = _compiler()
    target = cache_dir() / f"{name}-{_build_key(source, compiler)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{name}-", suffix=".so.partial", dir=target.parent)
    os.close(fd)
    try:
        command = [compiler, *FLAGS, f"-I{SOURCE_DIR}", f"-I{jax.ffi.include_dir()}", str(source), "-o", partial]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise NativeBuildError(
                f"Compiling {source.name} failed ({' '.join(command)}):\n{result.stderr[-2000:]}\n"
                f"Set {DISABLE_ENV}=0 to use the XLA formulation without trying to build."
            )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def ffi_target(name: str, symbol: str) -> str | None:
    """Registers handler ``symbol`` of ``<name>.cc`` as an XLA FFI target on CPU.

    Returns the target name, or None when the kernels are disabled or cannot be built
    (warned once per cause of failure). Safe to call from several threads; builds at most once
    per process.
    """
    if not enabled():
        return None
    with _lock:
        if (name, symbol) not in _targets:
            _targets[name, symbol] = _load(name, symbol)
        return _targets[name, symbol]


def _load(name: str, symbol: str) -> str | None:
    try:
        library = ctypes.CDLL(str(build(name)))
    except (NativeBuildError, OSError) as error:  # OSError: an unwritable cache, a library that will not load
        # One warning per cause: a missing compiler or cache fails every kernel alike.
        cause = str(error).replace(name, "<kernel>")
        if cause not in _failures:
            _failures.add(cause)
            warnings.warn(f"ca_flax: using the XLA formulation instead of the native kernels. {error}",
                          RuntimeWarning, stacklevel=4)
        return None
    target = f"ca_flax_{symbol}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return target
