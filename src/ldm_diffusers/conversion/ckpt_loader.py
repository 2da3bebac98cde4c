"""Reading CompVis / PyTorch Lightning ``.ckpt`` files without running what is inside them.

A ``.ckpt`` is a pickle (``torch.save``'s zip container: ``<name>/data.pkl`` plus one uncompressed entry per
storage). Unpickling can call any importable function, so this module never hands one to ``pickle`` /
``torch.load``: :mod:`.safe_pickle` runs the opcodes itself. What a checkpoint gets back, exactly:

* **for real, and new**: numbers, strings, bytes, ``None``, tuples, lists, dicts, sets; ``collections.OrderedDict``
  (with a plain-dict attribute state such as a state dict's ``_metadata``); tensors and parameters rebuilt by this
  module from ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor`` / ``_rebuild_parameter`` records over the
  storages ``torch.<Type>Storage`` names (``float16`` ... ``complex128``), each checked against its zip entry;
  ``torch.Size``, ``torch.device``, the ``torch`` dtypes (immutable); ``builtins`` ``set`` / ``frozenset`` /
  ``complex`` / ``bytes`` / ``bytearray`` (from data, never from a length) and ``_codecs.encode`` (how protocol 2
  writes bytes);
* **as inert placeholders** (:class:`~.safe_pickle.Placeholder`, module never imported): every other class name
  (the Lightning ``ModelCheckpoint`` callback, OmegaConf containers, numpy scalars and dtypes, ``typing.Any``);
* **refused** (:class:`UnsafeCheckpointError`): every other name of ``builtins``, ``torch``, ``numpy``,
  ``collections``, ``_codecs`` and every name of a module that can run code (``os``, ``subprocess``, ``_operator``,
  ``_functools``, ``copyreg``, ``typing``, ``pickle``, ...); REDUCE / BUILD / SETITEM(S) / APPEND(S) on anything
  this load did not make; extension codes (EXT1/2/4) and out-of-band buffers.

Memory is bounded by the file: zip entries must be stored uncompressed (as ``torch.save`` writes them) with their
central-directory size equal to what the pickle declares before anything is read, memo indices and string lengths
cannot exceed the pickle, and nothing allocates by a number the file gives. Every failure is a
:class:`CheckpointError` (or :class:`UnsafeCheckpointError`) naming the file and the place.

``torch.load(weights_only=True)`` is not enough here: it refuses the Lightning callback that every released
checkpoint carries, unless its class is imported or its name allow-listed in advance.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..utils.model_files import CheckpointError
from .safe_pickle import VALID_CHECKPOINT, BadValue, Builder, Placeholder, UnsafeCheckpointError, ValueUnpickler

__all__ = ["CheckpointError", "Placeholder", "UnsafeCheckpointError", "load_compvis_ckpt", "state_dict_of"]

STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in STORAGE_DTYPES.values()} | {
    "half": torch.float16, "float": torch.float32, "double": torch.float64, "long": torch.int64, "int": torch.int32}
MAX_DIMS = 64


@dataclass(frozen=True)
class StorageType:
    """What ``torch.<Type>Storage`` resolves to: only usable inside a storage record."""

    dtype: torch.dtype


class Storage:
    """One storage of the checkpoint: ``flat`` (1-D tensor over the bytes of its zip entry)."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat

    def __repr__(self):
        return f"<storage of {self.flat.numel()} {self.flat.dtype}>"


def _count(value, what: str) -> int:
    if type(value) is not int or value < 0 or value > 2**62:
        raise BadValue(f"{what} is {value!r}, not a non-negative int")
    return value


def _shape(value, what: str) -> tuple[int, ...]:
    if type(value) not in (tuple, torch.Size) or len(value) > MAX_DIMS:
        raise BadValue(f"{what} is {type(value).__name__} {value!r:.80}, not a tuple of at most {MAX_DIMS} ints")
    return tuple(_count(v, f"an entry of {what}") for v in value)


def _tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2: a view of ``storage`` after checking it lies inside it."""
    if not isinstance(storage, Storage):
        raise BadValue(f"a tensor record over {type(storage).__name__} {storage!r:.80}, not a storage")
    offset, size, stride = _count(offset, "a tensor offset"), _shape(size, "a tensor size"), _shape(stride, "a stride")
    if len(size) != len(stride):
        raise BadValue(f"a tensor of size {size} has {len(stride)} strides")
    numel, available = 1, storage.flat.numel()
    for n in size:
        numel *= n
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if numel and (last >= available or numel > available):
        raise BadValue(f"a tensor of size {size}, stride {stride} at offset {offset} needs more than the "
                       f"{available} elements of its storage")
    if type(requires_grad) is not bool or hooks not in (None, {}) or metadata not in (None, {}):
        raise BadValue("a tensor record with requires_grad, hooks or metadata of the wrong kind")
    tensor = storage.flat.as_strided(size, stride, offset) if numel else storage.flat.new_empty(size)
    if requires_grad:
        if not (tensor.is_floating_point() or tensor.is_complex()):
            raise BadValue(f"requires_grad on a {tensor.dtype} tensor (only floating-point tensors take gradients)")
        tensor.requires_grad_(True)
    return tensor


def _legacy_tensor(storage, offset, size, stride) -> torch.Tensor:
    return _tensor(storage, offset, size, stride)


def _parameter(data, requires_grad=True, hooks=None) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor) or type(requires_grad) is not bool or hooks not in (None, {}):
        raise BadValue("a parameter record whose data is not a tensor or with flags of the wrong kind")
    if requires_grad and not data.is_floating_point():
        raise BadValue(f"requires_grad on a {data.dtype} parameter (only floating-point tensors take gradients)")
    return torch.nn.Parameter(data.detach(), requires_grad=requires_grad)


def _ordered_dict(items=()) -> OrderedDict:
    if type(items) not in (list, tuple) or not all(type(i) is tuple and len(i) == 2 for i in items):
        raise BadValue("OrderedDict from something other than a list of (key, value) pairs")
    return OrderedDict(items)


def _items(values, kind):
    if type(values) not in (list, tuple, set, frozenset):
        raise BadValue(f"{kind.__name__} from a {type(values).__name__}, not from listed items")
    return kind(values)


def _text_bytes(text="", encoding="latin1", kind=bytes):
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise BadValue("bytes from something other than latin-1 text")
    return kind(text.encode("latin1"))


def _device(spec, index=None):
    if type(spec) is not str or (index is not None and type(index) is not int):
        raise BadValue(f"a device from {spec!r:.40}, not a name")
    return torch.device(spec) if index is None else torch.device(spec, index)


def _size(dims=()):
    return torch.Size(_shape(tuple(dims) if type(dims) is list else dims, "a torch.Size"))


def _complex(real=0.0, imag=0.0):
    if type(real) not in (int, float) or type(imag) not in (int, float):
        raise BadValue("complex from something other than two numbers")
    return complex(real, imag)


def _builders() -> dict:
    """The globals a checkpoint may name that are returned for real (see the module docstring)."""
    built = {("torch._utils", "_rebuild_tensor_v2"): _tensor, ("torch._utils", "_rebuild_tensor"): _legacy_tensor,
             ("torch._utils", "_rebuild_parameter"): _parameter, ("torch", "Size"): _size, ("torch", "device"): _device,
             ("_codecs", "encode"): _text_bytes}
    for module in ("builtins", "__builtin__"):
        built |= {(module, "set"): lambda v=(): _items(v, set), (module, "frozenset"): lambda v=(): _items(v, frozenset),
                  (module, "complex"): _complex, (module, "bytes"): _text_bytes,
                  (module, "bytearray"): lambda t="", e="latin1": _text_bytes(t, e, bytearray)}
    table = {key: Builder(".".join(key), fn) for key, fn in built.items()}
    table[("collections", "OrderedDict")] = Builder("collections.OrderedDict", _ordered_dict, new_object=True)
    table |= {("torch", name): StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()}
    table |= {("torch", name): dtype for name, dtype in DTYPE_NAMES.items()}
    return table


class _TorchZip:
    """torch.save's zip container, read with every size checked against the central directory first."""

    def __init__(self, archive: zipfile.ZipFile, path: Path):
        self.archive, self.path, self.storages = archive, path, {}
        size = path.stat().st_size
        for info in archive.infolist():
            if info.flag_bits & 0x1:
                raise CheckpointError(f"'{path}': zip entry {info.filename} is encrypted. " + VALID_CHECKPOINT)
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                raise CheckpointError(f"'{path}': zip entry {info.filename} is compressed (method "
                                      f"{info.compress_type}); torch.save stores entries uncompressed. " + VALID_CHECKPOINT)
            if info.header_offset + info.compress_size > size:
                raise CheckpointError(f"'{path}': zip entry {info.filename} runs past the end of the file; it is "
                                      "truncated or corrupt.")
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"'{path}' is a zip file but not torch's checkpoint container (no */data.pkl).")
        self.prefix = pickles[0][: -len("/data.pkl")]

    def read(self, name: str, size: int | None = None, limit: int | None = None) -> bytearray:
        """Entry ``<prefix>/<name>``; its directory size must equal ``size`` / be at most ``limit`` (when given)
        before it is read."""
        try:
            info = self.archive.getinfo(f"{self.prefix}/{name}")
        except KeyError:
            raise BadValue(f"the file has no entry {name}: it is incomplete") from None
        if size is not None and info.file_size != size:
            raise BadValue(f"entry {name} holds {info.file_size} bytes, its record declares {size}")
        if limit is not None and info.file_size > limit:
            raise BadValue(f"entry {name} holds {info.file_size} bytes, more than the {limit} it can have")
        with self.archive.open(info) as entry:
            data = bytearray(info.file_size)
            if entry.readinto(data) != info.file_size or entry.read(1):
                raise BadValue(f"entry {name} does not hold the {info.file_size} bytes its directory declares")
        return data

    def persistent_load(self, pid) -> Storage:
        """A storage record ("storage", StorageType, key, location, numel), read once per key."""
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise BadValue(f"unknown persistent id {pid!r:.80} (torch writes ('storage', type, key, location, numel))")
        _, kind, key, location, numel = pid
        if not isinstance(kind, StorageType) or type(key) is not str or not key.isalnum() or type(location) is not str:
            raise BadValue(f"storage record {pid!r:.80} has a wrong type, key or location")
        numel = _count(numel, f"storage {key}'s numel")
        if key in self.storages:
            flat = self.storages[key].flat
            if flat.dtype != kind.dtype or flat.numel() != numel:
                raise BadValue(f"storage {key} is declared twice with different types or sizes")
            return self.storages[key]
        itemsize = torch.empty((), dtype=kind.dtype).element_size()
        data = self.read(f"data/{key}", numel * itemsize)
        flat = torch.frombuffer(data, dtype=kind.dtype) if numel else torch.empty(0, dtype=kind.dtype)
        self.storages[key] = Storage(flat)
        return self.storages[key]


def _load_torch_zip(path: Path):
    with zipfile.ZipFile(path) as archive:
        container = _TorchZip(archive, path)
        try:
            if f"{container.prefix}/byteorder" in archive.namelist() and container.read("byteorder", limit=16) != b"little":
                raise CheckpointError(f"'{path}' was not saved little-endian; load it on such a machine and re-save it.")
            pickle_bytes = bytes(container.read("data.pkl"))
        except BadValue as err:
            raise CheckpointError(f"'{path}' is not a valid checkpoint: {err}. " + VALID_CHECKPOINT) from None
        return ValueUnpickler(pickle_bytes, str(path), _builders(), container.persistent_load).load()


def load_compvis_ckpt(path: str | os.PathLike) -> dict:
    """The object saved in a ``.ckpt`` / ``.pt`` (torch's zip format) or a ``.safetensors`` file, loaded safely.

    Returns the saved dict (a Lightning checkpoint: ``{"state_dict": ..., "global_step": ..., "callbacks": ...}``);
    a safetensors file gives ``{"state_dict": tensors}``. Raises :class:`UnsafeCheckpointError` for a pickle that
    names a code-running callable or operation and :class:`CheckpointError` for anything else that is not a valid
    checkpoint (missing entries, sizes that disagree, truncated or corrupt files)."""
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
        return _load_torch_zip(path)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError,
            NotImplementedError, RuntimeError) as err:
        raise CheckpointError(f"'{path}' could not be read as a checkpoint ({type(err).__name__}: {err}); the file "
                              "is truncated or corrupt, download it again.") from err


def state_dict_of(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model weights of a loaded checkpoint (Lightning's ``state_dict``, or the dict itself), as a plain dict of
    str -> tensor (read with ``dict``'s own methods, so attributes the file gave the dict change nothing)."""
    state = dict.get(checkpoint, "state_dict", checkpoint) if type(checkpoint) in (dict, OrderedDict) else None
    if type(state) not in (dict, OrderedDict) or not all(
            type(k) is str and type(v) in (torch.Tensor, torch.nn.Parameter) for k, v in dict.items(state)):
        raise CheckpointError("The checkpoint holds no state dict of tensors (expected a 'state_dict' entry mapping "
                              "parameter names to tensors).")
    return dict(dict.items(state))
