"""Reading and writing PyTorch-style state dicts, safely.

Formats, chosen by suffix:

- ``.pth``, ``.pt``, ``.bin``, ``.pth.tar``: ``torch.save`` pickles, read with
  ``torch.load(weights_only=True)`` so no code from the file ever runs. Needs PyTorch,
  imported only here and only when such a file is read or written.
- ``.safetensors``: parsed here (8-byte header length, JSON header, raw little-endian
  data), so bfloat16 works and PyTorch is not needed.
- ``.npz``: ``numpy.load(allow_pickle=False)``.

Reading also unwraps the containers training scripts save (``{'state_dict': ...}``,
``{'model': ...}``, ``{'state_dict_ema': ...}``), strips ``module.`` (DataParallel) and
``_orig_mod.`` (``torch.compile``) prefixes, upcasts float16/bfloat16 to float32 and
refuses non-float tensors and NaN/Inf values. Every problem is a :class:`ConversionError`
naming the file.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import pickletools
import secrets
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ca_flax.convert.errors import ConversionError

StateDict = dict[str, np.ndarray]
Source = Union[str, "os.PathLike[str]", Mapping[str, Any]]

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SUFFIXES = TORCH_SUFFIXES + (".safetensors", ".npz")
READ_SUFFIXES = SUFFIXES + (".pth.tar",)

# Containers training scripts wrap the weights in. EMA weights first (as timm's loader
# does by default) unless the caller asks for the raw ones.
_EMA_KEYS = ("state_dict_ema", "model_ema")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
# Integer buffers a state dict may legitimately hold (BatchNorm's batch counter).
INT_BUFFER_SUFFIX = "num_batches_tracked"

_TORCH_MISSING = (
    "reading a PyTorch pickle (.pth/.pt/.bin) needs PyTorch, which is not installed. "
    "Install it with `pip install torch` (the CPU wheel is enough: `pip install torch "
    "--index-url https://download.pytorch.org/whl/cpu`), or convert the file to "
    ".safetensors where PyTorch is available; .safetensors and .npz need no PyTorch."
)


@dataclass
class LoadedStateDict:
    """A flat state dict as numpy arrays, with where it came from and what was done."""

    arrays: StateDict
    origin: str
    notes: list[str] = field(default_factory=list)


def describe_source(source: Any) -> str:
    """How messages name a source: the path, or 'in-memory state dict'."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "in-memory state dict"


def load_state_dict(source: Source, *, use_ema: bool = True) -> LoadedStateDict:
    """Reads a checkpoint file or an in-memory state dict into flat numpy arrays.

    Args:
      source: a path (``.pth``, ``.pt``, ``.bin``, ``.safetensors``, ``.npz``) or a mapping
        of names to ``torch.Tensor`` / numpy arrays, possibly wrapped as above.
      use_ema: when a checkpoint holds both EMA and raw weights, take the EMA ones.

    Raises:
      ConversionError: unreadable file, unsafe pickle, not a state dict, non-float or
        non-finite tensors.
    """
    origin = describe_source(source)
    notes: list[str] = []
    if isinstance(source, (str, os.PathLike)):
        raw = _read_file(Path(source))
    elif isinstance(source, Mapping):
        raw = source
    else:
        raise ConversionError(
            f"Cannot convert a {type(source).__name__}: pass a checkpoint path "
            f"({', '.join(READ_SUFFIXES)}) or a state dict (a mapping of names to tensors or numpy arrays)."
        )
    flat = _unwrap(raw, origin, use_ema, notes)
    flat = _strip_prefixes(flat, notes)
    arrays = {key: _to_numpy(key, value, origin) for key, value in flat.items()}
    _check_dtypes(arrays, origin, notes)
    _check_finite(arrays, origin)
    return LoadedStateDict(arrays, origin, notes)


# -- reading files ---------------------------------------------------------------------


def _read_file(path: Path) -> Any:
    if not path.exists():
        raise ConversionError(f"{path}: no such file.")
    if path.is_dir():
        raise ConversionError(
            f"{path}: is a directory, not a checkpoint file. Pass the weights file itself "
            f"({', '.join(READ_SUFFIXES)}); a ca-flax checkpoint directory is read with "
            "ca_flax.checkpoints.load_model."
        )
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: the file is empty (0 bytes); the download or save was probably interrupted.")
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES or path.name.lower().endswith(".pth.tar"):  # timm's model_best.pth.tar
        return _read_torch(path)
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix == ".npz":
        return _read_npz(path)
    raise ConversionError(
        f"{path}: unknown file type {path.suffix or '(no suffix)'!r}; supported: {', '.join(READ_SUFFIXES)}."
    )


def _import_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: {_TORCH_MISSING}") from None
    return torch


def _first_line(error: BaseException) -> str:
    """The first sentence of an exception's message (library messages run long)."""
    lines = str(error).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__


def _read_torch(path: Path) -> Any:
    torch = _import_torch(path)
    try:
        with warnings.catch_warnings():  # plain pickles of other protocols: the error says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        offending = _unsafe_globals(torch, path)
        whole = _pickled_object_class(path) if offending else None
        if whole is not None:  # torch.save(model), not of its state_dict(): no key holds the weights
            raise ConversionError(
                f"{path}: refused to load: it holds a whole pickled {whole} object (what `torch.save(model)` "
                "writes), not a state dict, and unpickling it could run code from the file. Save the weights "
                "instead where the model is defined, `torch.save(model.state_dict(), 'weights.pth')` (or, if "
                "you trust the file, `torch.save(torch.load(path, weights_only=False).state_dict(), "
                "'weights.pth')`), and convert that file."
            ) from None
        if offending:
            raise ConversionError(
                f"{path}: refused to load: the pickle references Python objects besides tensors and "
                f"plain containers ({', '.join(offending)}), and unpickling them could run code from the "
                "file. If you trust it, extract the weights once with PyTorch, e.g. "
                "`sd = torch.load(path, weights_only=False)['state_dict']; "
                "safetensors.torch.save_file(sd, 'weights.safetensors')`, and convert the .safetensors file."
            ) from None
        raise ConversionError(
            f"{path}: not a PyTorch checkpoint, or a corrupt one ({_first_line(error)})."
        ) from None
    except Exception as error:  # noqa: BLE001 -- the unpickler fails in many ways on garbage
        raise ConversionError(
            f"{path}: cannot be read as a PyTorch checkpoint: it is truncated, corrupt or not a "
            f"checkpoint at all ({type(error).__name__}: {_first_line(error)})."
        ) from None


def _unsafe_globals(torch: Any, path: Path) -> list[str]:
    """Names of the globals ``weights_only`` refuses, or [] when the file is not a
    readable pickle at all (garbage, truncated)."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:  # torch < 2.5: can't list them, but it is a pickle problem
        return ["(unknown: upgrade torch to list them)"]
    try:
        return sorted(finder(path))
    except Exception:  # noqa: BLE001 -- any failure means "not a readable pickle"
        return []


# Top-level classes that are containers of a state dict, not a pickled object.
_CONTAINER_CLASSES = ("collections.OrderedDict", "builtins.dict")


def _pickled_object_class(path: Path) -> str | None:
    """``'module.Class'`` when a ``torch.save`` archive holds an object (a model) at its
    top level, else None (a dict or list, or a file this cannot tell about). Reads the
    pickle's first opcodes and runs nothing. Protocols up to 3 (``torch.save`` writes 2),
    the ones PyTorch lists unsafe globals for."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), None)
            data = archive.read(name) if name is not None else b""
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "PROTO":
                continue
            found = arg.replace(" ", ".") if opcode.name == "GLOBAL" else None
            return found if found not in _CONTAINER_CLASSES else None
    except (OSError, zipfile.BadZipFile, ValueError):  # ValueError: a truncated pickle
        return None
    return None


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # np.load would take anything else for a pickle
        raise ConversionError(f"{path}: not an .npz archive (no zip header); save the state dict with numpy.savez.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise ConversionError(
                f"{path}: holds object arrays that need pickle, which is refused; save plain numeric arrays."
            ) from None
        raise ConversionError(f"{path}: not a valid .npz archive ({_first_line(error)}).") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise ConversionError(
            f"{path}: not a valid .npz archive: it is truncated or corrupt ({_first_line(error)})."
        ) from None


def _safetensors_dtypes() -> dict[str, Any]:
    import ml_dtypes  # a jax dependency; numpy has no bfloat16 of its own

    return {
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    }


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file into numpy arrays (bfloat16 as ``ml_dtypes.bfloat16``).

    Implemented from the format (little-endian u64 header size, JSON header, data) rather
    than with the ``safetensors`` package, whose numpy reader rejects bfloat16.
    """
    path = Path(path)
    data = path.read_bytes()
    bad = f"{path}: not a valid .safetensors file"
    if len(data) < 8:
        raise ConversionError(f"{bad}: only {len(data)} bytes, shorter than the header size field.")
    header_size = int.from_bytes(data[:8], "little")
    if header_size > len(data) - 8:
        raise ConversionError(
            f"{bad}: the header claims {header_size} bytes but the file has {len(data)}; it is truncated "
            "or not a safetensors file."
        )
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConversionError(f"{bad}: the header is not JSON.") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{bad}: the header is not a JSON object.")
    header.pop("__metadata__", None)
    dtypes = _safetensors_dtypes()
    base = 8 + header_size
    arrays = {}
    for key, info in header.items():
        try:
            dtype = np.dtype(dtypes[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(
                f"{bad}: malformed or unsupported header entry for {key!r}: {info!r} "
                f"(supported dtypes: {', '.join(dtypes)})."
            ) from None
        if base + end > len(data):
            raise ConversionError(
                f"{path}: truncated: tensor {key!r} ends at byte {base + end} but the file has only {len(data)} bytes."
            )
        count = math.prod(shape)
        if end - start != count * dtype.itemsize:
            raise ConversionError(f"{bad}: tensor {key!r} has {end - start} bytes for shape {shape} of {dtype.name}.")
        arrays[key] = np.frombuffer(data, dtype.newbyteorder("<"), count, base + start).reshape(shape).copy()
    return arrays


# -- unwrapping ------------------------------------------------------------------------


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _unwrap(obj: Any, origin: str, use_ema: bool, notes: list[str], depth: int = 0) -> Mapping[str, Any]:
    """Descends through wrapper dicts to the mapping that holds the tensors."""
    if not isinstance(obj, Mapping):
        raise ConversionError(
            f"{origin}: not a checkpoint of weights: it holds a {type(obj).__name__}, not a dict of tensors."
        )
    if not obj:
        raise ConversionError(f"{origin}: the state dict is empty.")
    if not any(isinstance(v, Mapping) for v in obj.values()):
        if not any(_is_array(v) for v in obj.values()):
            raise ConversionError(
                f"{origin}: not a checkpoint of weights: no tensors found (top-level keys: {_preview(obj)})."
            )
        return obj
    order = _EMA_KEYS + _WRAPPER_KEYS if use_ema else _WRAPPER_KEYS + _EMA_KEYS
    present = [k for k in order if isinstance(obj.get(k), Mapping)]
    if not present or depth >= 3:
        raise ConversionError(
            f"{origin}: no state dict found: the top-level keys are {_preview(obj)}; expected tensors or one "
            f"of the wrapper keys {', '.join(map(repr, order))}."
        )
    chosen = present[0]
    also = f" (also present: {', '.join(map(repr, present[1:]))})" if present[1:] else ""
    notes.append(f"weights taken from the checkpoint's {chosen!r} entry{also}.")
    return _unwrap(obj[chosen], origin, use_ema, notes, depth + 1)


def _preview(keys: Any, limit: int = 8) -> str:
    keys = [str(k) for k in keys]
    shown = ", ".join(map(repr, keys[:limit]))
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"


def _strip_prefixes(flat: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    """Removes ``module.`` / ``_orig_mod.`` when every key carries it (repeatedly, as
    DataParallel around a compiled model stacks them)."""
    flat = {str(k): v for k, v in flat.items()}
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in flat):
                flat = {k[len(prefix):]: v for k, v in flat.items()}
                notes.append(f"stripped the {prefix!r} prefix from every key.")
                changed = True
    return flat


# -- arrays ----------------------------------------------------------------------------


def _to_numpy(key: str, value: Any, origin: str) -> np.ndarray:
    module = type(value).__module__
    if module.startswith("torch"):
        import torch  # already imported by whoever made the tensor

        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: exact upcast here
            import ml_dtypes

            return tensor.float().numpy().astype(ml_dtypes.bfloat16)
        return tensor.numpy()
    if isinstance(value, np.ndarray):
        return value
    if _is_array(value):  # jax arrays and other array-likes
        return np.asarray(value)
    raise ConversionError(
        f"{origin}: entry {key!r} is a {type(value).__name__}, not a tensor; a state dict maps names to tensors."
    )


def _is_low_float(dtype: np.dtype) -> bool:
    return dtype == np.float16 or dtype.name == "bfloat16"


def _check_dtypes(arrays: StateDict, origin: str, notes: list[str]) -> None:
    """Upcasts float16/bfloat16 (exactly) and refuses non-float tensors."""
    low = sorted({a.dtype.name for a in arrays.values() if _is_low_float(a.dtype)})
    bad = []
    for key, array in arrays.items():
        if _is_low_float(array.dtype):
            arrays[key] = array.astype(np.float32)
        elif key.rsplit(".", 1)[-1] == INT_BUFFER_SUFFIX:
            if not np.issubdtype(array.dtype, np.integer):
                bad.append(f"{key} ({array.dtype.name})")
        elif not np.issubdtype(array.dtype, np.floating):
            bad.append(f"{key} ({array.dtype.name})")
    if bad:
        raise ConversionError(
            f"{origin}: non-float tensors where weights are expected: {', '.join(bad[:5])}"
            f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}. Quantized or corrupted checkpoints "
            "cannot be converted; export float weights."
        )
    if low:
        notes.append(
            f"{' and '.join(low)} weights upcast to float32 (exact; the outputs are those of the "
            "reduced-precision weights, not of the original float32 training weights)."
        )


def _check_finite(arrays: StateDict, origin: str) -> None:
    bad = [
        f"{key} ({int(np.size(a) - np.isfinite(a).sum())} of {np.size(a)} values)"
        for key, a in arrays.items()
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all()
    ]
    if bad:
        raise ConversionError(
            f"{origin}: NaN or Inf values in {', '.join(bad[:5])}"
            f"{f' and {len(bad) - 5} more tensors' if len(bad) > 5 else ''}; the training run probably "
            "diverged before this checkpoint was saved."
        )


# -- writing ---------------------------------------------------------------------------


def save_state_dict(arrays: Mapping[str, np.ndarray], path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Writes a state dict as ``.pth``/``.pt``/``.bin`` (``torch.save`` of tensors, needs
    PyTorch), ``.safetensors`` or ``.npz``, atomically: the data goes to a temporary file
    in the same directory that is renamed into place, so ``path`` is never partial.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConversionError(f"{path}: unknown output type {path.suffix or '(no suffix)'!r}; use one of {', '.join(SUFFIXES)}.")
    if path.is_dir():
        raise ConversionError(f"{path}: is a directory; give a file name ending in {suffix}.")
    if path.exists() and not overwrite:
        raise ConversionError(f"{path}: already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    torch = _import_torch(path) if suffix in TORCH_SUFFIXES else None
    # np.array, not np.ascontiguousarray, which turns 0-d counters into shape (1,).
    contiguous = {k: np.array(v, order="C") for k, v in arrays.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = path.parent / f".{path.name}.tmp-{secrets.token_hex(6)}"
    # os.open with mode 0o666 honours the umask, unlike tempfile.mkstemp (always 0600).
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if torch is not None:
                torch.save({k: torch.from_numpy(v) for k, v in contiguous.items()}, f)
            elif suffix == ".safetensors":
                from safetensors.numpy import save

                f.write(save(contiguous))
            else:
                np.savez(f, **contiguous)
        os.replace(tmp_name, path)
    except BaseException:
        tmp_name.unlink(missing_ok=True)
        raise
    return path
