"""Reading CompVis / PyTorch Lightning ``.ckpt`` files without running what is inside them.

A ``.ckpt`` is a pickle (``torch.save``'s zip container: ``<name>/data.pkl`` plus one file per storage). Unpickling
can call any importable function, so this module never hands one to ``pickle`` / ``torch.load`` unrestricted: its
own unpickler rebuilds tensors (``torch._utils._rebuild_tensor_v2`` over storages read from the zip) and plain
containers, turns every other class it meets (a Lightning ``ModelCheckpoint`` callback, numpy scalars) into an
inert :class:`Placeholder` **without importing its module**, and refuses outright a pickle that names a callable
from a module that can run code (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...): nothing of it runs.

``torch.load(weights_only=True)`` is not enough here: it refuses the Lightning callback that every released
checkpoint carries, unless its class is imported or its name allow-listed in advance.
"""

from __future__ import annotations

import builtins
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..utils.model_files import CheckpointError


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint's pickle asks for a callable that could run code; it was not loaded."""


class Placeholder:
    """An object of a class the checkpoint names but that is not rebuilt (its module is never imported); keeps
    the constructor arguments and state it was pickled with, for inspection."""

    _global = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<placeholder for {self._global}>"


# Modules whose globals can run code or touch the system; a checkpoint has no reason to name any of them.
DANGEROUS_MODULES = {
    "os", "posix", "nt", "sys", "subprocess", "shutil", "builtins", "__builtin__", "importlib", "runpy", "pty",
    "socket", "ctypes", "code", "codeop", "marshal", "pickle", "_pickle", "types", "functools", "operator",
    "webbrowser", "multiprocessing", "io", "_io", "pathlib", "tempfile", "signal", "threading", "asyncio",
    "platform", "inspect", "pdb", "commands", "popen2", "timeit", "urllib", "http", "requests", "shlex", "glob",
    "zipimport", "pkgutil", "site", "distutils", "setuptools", "pip", "torch.hub", "torch.serialization",
}
# Builtins that only build plain values.
SAFE_BUILTINS = {"set", "frozenset", "bytearray", "bytes", "complex", "slice", "range", "dict", "list", "tuple",
                 "int", "float", "bool", "str"}
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
REBUILDERS = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "Size"): torch.Size,
}


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file)
        self.archive, self.prefix, self.source = archive, prefix, source
        self.storages: dict[str, torch.storage.TypedStorage] = {}
        self.placeholders: set[str] = set()

    def find_class(self, module: str, name: str):
        if (module, name) in REBUILDERS:
            return REBUILDERS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module in ("builtins", "__builtin__") and name in SAFE_BUILTINS:
            return getattr(builtins, name)
        root = module.split(".")[0]
        if module in DANGEROUS_MODULES or root in DANGEROUS_MODULES:
            raise UnsafeCheckpointError(
                f"'{self.source}' asks to call {module}.{name} while loading, which could run code on this machine: "
                "refused, nothing was executed. A checkpoint only needs tensors and plain containers; get the file "
                "from its original source."
            )
        self.placeholders.add(f"{module}.{name}")
        return type(name, (Placeholder,), {"_global": f"{module}.{name}", "__module__": "ldm_diffusers.placeholders"})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) == 5):
            raise CheckpointError(f"'{self.source}': unknown persistent id {pid!r} in the pickle.")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"'{self.source}': storage of unknown type {storage_type!r}.")
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}/data/{key}")
            except KeyError as err:
                raise CheckpointError(f"'{self.source}' lacks storage data/{key}: the file is incomplete.") from err
            itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
            if len(raw) != numel * itemsize:
                raise CheckpointError(f"'{self.source}': storage {key} has {len(raw)} bytes, expected {numel * itemsize}.")
            flat = torch.frombuffer(bytearray(raw), dtype=storage_type.dtype) if raw else torch.empty(0, dtype=storage_type.dtype)
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=flat.untyped_storage(),
                                                            dtype=storage_type.dtype, _internal=True)
        return self.storages[key]


def load_compvis_ckpt(path: str | os.PathLike) -> dict:
    """The object saved in a ``.ckpt`` / ``.pt`` (torch's zip format) or a ``.safetensors`` file, loaded safely.

    Returns the saved dict (a Lightning checkpoint: ``{"state_dict": ..., "global_step": ..., "callbacks": ...}``);
    a safetensors file gives ``{"state_dict": tensors}``. Raises :class:`UnsafeCheckpointError` for a pickle that
    names a code-running callable and :class:`CheckpointError` for a missing, truncated or non-checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at '{path}'.")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if path.suffix == ".safetensors" or (head[8:9] == b"{" and not zipfile.is_zipfile(path)):  # 8-byte size, JSON

        try:
            return {"state_dict": load_file(str(path))}
        except Exception as err:  # safetensors raises its own error type for every header problem
            raise CheckpointError(f"'{path}' is not a readable safetensors file ({err}).") from err
    if not zipfile.is_zipfile(path):
        kind = ("a pickle in torch's legacy (pre-1.6) format, which this loader does not read; re-save it with a "
                "current torch" if head[:1] == b"\x80" else "not a torch checkpoint (no zip container)")
        raise CheckpointError(f"'{path}' is {kind}, or it is truncated (a zip's directory is at its end).")
    try:
        archive = zipfile.ZipFile(path)
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"'{path}' is a zip file but not torch's checkpoint container (no */data.pkl).")
        prefix = pickles[0][: -len("/data.pkl")]
        if archive.namelist().count(f"{prefix}/byteorder") and archive.read(f"{prefix}/byteorder") != b"little":
            raise CheckpointError(f"'{path}' was saved big-endian; load it on such a machine and re-save it.")
        with archive.open(pickles[0]) as data:
            unpickler = _RestrictedUnpickler(data, archive, prefix, str(path))
            return unpickler.load()
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError, OSError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"'{path}' could not be read as a checkpoint ({type(err).__name__}: {err}); the file "
                              "is truncated or corrupt, download it again.") from err


def state_dict_of(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model weights of a loaded checkpoint (Lightning's ``state_dict``, or the dict itself)."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("The checkpoint holds no state dict of tensors (expected a 'state_dict' entry).")
    return state
