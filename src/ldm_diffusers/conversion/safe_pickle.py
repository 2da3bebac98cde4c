"""A pickle interpreter that only builds values: the reader behind :func:`~.ckpt_loader.load_compvis_ckpt`.

Written by hand because no library does this job: ``pickle.Unpickler`` applies REDUCE / BUILD / SETITEMS to whatever
its ``find_class`` returns (so even a restricted one lets a file set ``__defaults__`` on a torch function it was
given, changing every later ``torch.load`` in the process), and its C code sizes memo tables and buffers from the
file; torch's ``weights_only`` unpickler refuses the Lightning callback that every released checkpoint carries.
Here ``pickletools.genops`` (stdlib) decodes the opcodes of an in-memory pickle and :class:`ValueUnpickler` runs
them. Every object it hands out is made by this load, and a global the pickle names resolves to one of:

* a **builder** (:class:`Builder`): a function of this package that REDUCE may call with checked arguments
  (tensors, storages, ``OrderedDict``, ``torch.Size``, sets, ...); the library object of that name is never returned;
* a **placeholder**: a new inert subclass of :class:`Placeholder`, one per name per load, for the classes a
  checkpoint may carry (the Lightning callback, OmegaConf containers, numpy scalars); its module is never imported,
  calling it only records the arguments and BUILD only records the state;
* a refusal (:class:`UnsafeCheckpointError`): every other name of a module that holds callables (``os``,
  ``builtins``, ``_operator``, ``copyreg``, ``torch``, ``numpy``, ...; see :func:`refused`).
"""

from __future__ import annotations

import io
import pickletools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..utils.model_files import CheckpointError

VALID_CHECKPOINT = ("A valid checkpoint is torch.save's zip of a pickle of dicts, lists, numbers, strings and tensors; "
                    "re-save it with torch.save or get it again from its original source.")


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint's pickle names a callable or asks for an operation that could run code or change objects
    outside the result; it was not loaded and nothing of it ran."""


class BadValue(ValueError):
    """Raised by a builder or ``persistent_load`` for arguments of the wrong kind; reported with the position."""


class Placeholder:
    """An object of a class the checkpoint names but that is not rebuilt (its module is never imported): keeps the
    arguments it was made with (``args``, ``kwargs``) and the state it was given (``state``), for inspection."""

    _global = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __repr__(self):
        return f"<placeholder for {self._global}>"


@dataclass(frozen=True)
class Builder:
    """A global returned for real: REDUCE calls ``build(*args)``, which checks its arguments and makes a new value.
    ``new_object``: NEWOBJ (``cls.__new__(cls, *args)``) may call it too."""

    name: str
    build: Callable
    new_object: bool = False

    def __repr__(self):
        return self.name


# Modules whose globals can run code, reach the system or mutate the interpreter; a checkpoint names none of them.
CODE_MODULES = {
    "os", "posix", "nt", "sys", "subprocess", "_posixsubprocess", "shutil", "importlib", "runpy", "pty", "socket",
    "ctypes", "_ctypes", "code", "codeop", "marshal", "pickle", "_pickle", "pickletools", "copyreg", "copy_reg",
    "copy", "types", "typing", "functools", "_functools", "operator", "_operator", "itertools", "webbrowser",
    "multiprocessing", "io", "_io", "pathlib", "tempfile", "signal", "threading", "_thread", "asyncio", "platform",
    "inspect", "pdb", "bdb", "commands", "popen2", "timeit", "urllib", "http", "requests", "shlex", "glob",
    "zipimport", "pkgutil", "site", "distutils", "setuptools", "pip", "gc", "weakref", "atexit", "ast", "dis",
    "string", "re", "logging", "sqlite3", "dbm", "shelve", "tarfile", "zipfile", "lzma", "bz2", "gzip", "zlib",
}
# Namespaces that hold callables next to the few names a checkpoint legitimately uses: everything in them that is
# neither a builder nor in PLACEHOLDER_NAMES is refused (``builtins.eval``, ``torch.load``, ``numpy.load``,
# ``torch.storage._load_from_bytes``, ``collections.namedtuple``, ``_codecs.decode``, ...).
LIBRARY_ROOTS = {"builtins", "__builtin__", "torch", "numpy", "collections", "_collections", "_codecs", "codecs"}
# Names of those modules that checkpoints carry as data and that stay inert placeholders. Any other module's names
# (the Lightning callback, OmegaConf containers, the training code's own classes) are placeholders too.
PLACEHOLDER_NAMES = {
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype", "numpy.ndarray",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "typing.Any",  # OmegaConf containers record it as their element type
}


def refused(qualified: str) -> bool:
    """Whether the global ``module.name`` is refused (a name of a code-capable module or of a library namespace
    that is not an allowed placeholder)."""
    parts = qualified.split(".")
    if any(".".join(parts[:i]) in CODE_MODULES for i in range(1, len(parts))):
        return qualified not in PLACEHOLDER_NAMES
    return parts[0] in LIBRARY_ROOTS and qualified not in PLACEHOLDER_NAMES


_MARK = object()
# What one opcode may cost in bytes of Python objects, at most (an empty set is 216 bytes, a dict 64 and 184 once
# filled, a rebuilt tensor a few hundred); every other opcode is charged 64, which exceeds what it allocates (a
# reference in a container, a small int). Strings and bytes are charged their length on top.
OPCODE_COST = {"EMPTY_SET": 256, "FROZENSET": 256, "EMPTY_DICT": 256, "DICT": 256, "REDUCE": 1024, "NEWOBJ": 1024,
               "NEWOBJ_EX": 1024, "INST": 1024, "OBJ": 1024, "GLOBAL": 1024, "STACK_GLOBAL": 1024, "BINPERSID": 512}
FREE_BYTES = 16 * 2**20  # the budget of objects is this plus OBJECT_BYTES_PER_PICKLE_BYTE x the pickle's length
OBJECT_BYTES_PER_PICKLE_BYTE = 16


class ValueUnpickler:
    """Runs one pickle (``data``, bytes) with the given ``builders`` ({(module, name): Builder or immutable value}) and
    ``persistent_load`` (called with each persistent id); ``source`` names the file in errors."""

    def __init__(self, data: bytes, source: str, builders: dict, persistent_load: Callable):
        self.data, self.source, self.builders, self.persistent_load = data, source, builders, persistent_load
        self.stack: list = []
        self.memo: dict[int, object] = {}
        self.placeholders: dict[str, type] = {}
        self.position, self.opcode = 0, "?"
        self.budget = FREE_BYTES + OBJECT_BYTES_PER_PICKLE_BYTE * len(data)

    # -- errors ------------------------------------------------------------------------------------------------------
    def error(self, what: str, unsafe: bool = False) -> CheckpointError:
        where = f"data.pkl byte {self.position}, opcode {self.opcode}"
        if unsafe:
            return UnsafeCheckpointError(f"'{self.source}' {what} ({where}): refused, nothing was executed. "
                                         + VALID_CHECKPOINT)
        return CheckpointError(f"'{self.source}' is not a valid checkpoint: {what} ({where}). " + VALID_CHECKPOINT)

    # -- the machine -------------------------------------------------------------------------------------------------
    def load(self):
        """The pickled object. Raises CheckpointError / UnsafeCheckpointError, nothing else."""
        ops = pickletools.genops(io.BytesIO(self.data))
        while True:
            try:
                op, arg, position = next(ops)
            except StopIteration:
                raise self.error("the pickle ends without its STOP opcode") from None
            except ValueError as err:  # genops: unknown opcode, truncated or malformed argument
                self.opcode = f"after {self.opcode}"
                raise self.error(f"malformed pickle ({err})") from None
            self.position, self.opcode = position, op.name
            self.budget -= OPCODE_COST.get(op.name, 64) + (len(arg) if isinstance(arg, (str, bytes)) else 0)
            if self.budget < 0:
                raise self.error(f"the pickle builds more objects than its {len(self.data)} bytes can justify")
            if op.name == "STOP":
                return self._stop()
            handler = getattr(self, f"op_{op.name}", None)
            if handler is None:
                raise self.error(f"opcode {op.name} is not used by torch.save", unsafe=op.name.startswith("EXT"))
            try:
                handler(arg)
            except CheckpointError:
                raise
            except BadValue as err:
                raise self.error(str(err)) from None
            except (TypeError, ValueError, IndexError, KeyError, AttributeError, RuntimeError, OverflowError,
                    RecursionError, UnicodeError) as err:  # a value of the wrong kind for the opcode (e.g. a list key)
                raise self.error(f"{type(err).__name__}: {err}") from None

    def _stop(self):
        if len(self.stack) != 1:
            raise self.error(f"STOP with {len(self.stack)} values on the stack, not one")
        value = self.stack.pop()
        if isinstance(value, (Builder, type)):
            raise self.error(f"the pickle's result is the global {value!r}, not a value")
        return value

    def push(self, value):
        self.stack.append(value)

    def pop(self):
        if not self.stack or self.stack[-1] is _MARK:
            raise self.error("the stack is empty")
        return self.stack.pop()

    def pop_mark(self) -> list:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is _MARK:
                items = self.stack[i + 1:]
                del self.stack[i:]
                return items
        raise self.error("no MARK on the stack")

    def top(self):
        if not self.stack or self.stack[-1] is _MARK:
            raise self.error("the stack is empty")
        return self.stack[-1]

    # -- values ------------------------------------------------------------------------------------------------------
    def _value(self, arg):
        self.push(arg)

    op_INT = op_BININT = op_BININT1 = op_BININT2 = op_LONG = op_LONG1 = op_LONG4 = _value
    op_BINFLOAT = op_FLOAT = op_UNICODE = op_SHORT_BINUNICODE = op_BINUNICODE = op_BINUNICODE8 = _value
    op_BINBYTES = op_SHORT_BINBYTES = op_BINBYTES8 = op_STRING = op_BINSTRING = op_SHORT_BINSTRING = _value

    def op_BYTEARRAY8(self, arg):
        self.push(bytearray(arg))

    def op_NONE(self, _):
        self.push(None)

    def op_NEWTRUE(self, _):
        self.push(True)

    def op_NEWFALSE(self, _):
        self.push(False)

    def op_PROTO(self, arg):
        if not 0 <= arg <= 5:
            raise self.error(f"unknown pickle protocol {arg}")

    def op_FRAME(self, _):
        pass

    # -- stack -------------------------------------------------------------------------------------------------------
    def op_MARK(self, _):
        self.push(_MARK)

    def op_POP(self, _):
        if self.stack and self.stack[-1] is _MARK:
            self.stack.pop()
        else:
            self.pop()

    def op_POP_MARK(self, _):
        self.pop_mark()

    def op_DUP(self, _):
        self.push(self.top())

    # -- memo (a dict: an index costs nothing until used, and is bounded by the pickle's length) -----------------------
    def op_PUT(self, index):
        if not 0 <= index <= len(self.data):
            raise self.error(f"memo index {index} is beyond the pickle's {len(self.data)} bytes")
        self.memo[index] = self.top()

    op_BINPUT = op_LONG_BINPUT = op_PUT

    def op_MEMOIZE(self, _):
        self.memo[len(self.memo)] = self.top()

    def op_GET(self, index):
        if index not in self.memo:
            raise self.error(f"memo index {index} was never stored")
        self.push(self.memo[index])

    op_BINGET = op_LONG_BINGET = op_GET

    # -- containers --------------------------------------------------------------------------------------------------
    def op_EMPTY_TUPLE(self, _):
        self.push(())

    def op_TUPLE(self, _):
        self.push(tuple(self.pop_mark()))

    def op_TUPLE1(self, _):
        self.push((self.pop(),))

    def op_TUPLE2(self, _):
        b, a = self.pop(), self.pop()
        self.push((a, b))

    def op_TUPLE3(self, _):
        c, b, a = self.pop(), self.pop(), self.pop()
        self.push((a, b, c))

    def op_EMPTY_LIST(self, _):
        self.push([])

    def op_LIST(self, _):
        self.push(self.pop_mark())

    def op_EMPTY_DICT(self, _):
        self.push({})

    def op_DICT(self, _):
        items = self.pop_mark()
        if len(items) % 2:
            raise self.error("DICT with an odd number of items")
        self.push(dict(zip(items[::2], items[1::2])))

    def op_EMPTY_SET(self, _):
        self.push(set())

    def op_FROZENSET(self, _):
        self.push(frozenset(self.pop_mark()))

    def _target(self, kinds: tuple, items_count: int = 0):
        """The container under the items, checked to be a plain one this load made."""
        target = self.top()
        if type(target) not in kinds:
            what = target.__name__ if isinstance(target, type) else type(target).__name__
            raise self.error(f"{self.opcode} on a {what}; only {' / '.join(k.__name__ for k in kinds)} made by this "
                             "pickle may be filled", unsafe=True)
        return target

    def op_APPEND(self, _):
        value = self.pop()
        self._target((list,)).append(value)

    def op_APPENDS(self, _):
        items = self.pop_mark()
        self._target((list,)).extend(items)

    def op_SETITEM(self, _):
        value, key = self.pop(), self.pop()
        self._target((dict, OrderedDict))[key] = value

    def op_SETITEMS(self, _):
        items = self.pop_mark()
        if len(items) % 2:
            raise self.error("SETITEMS with an odd number of items")
        target = self._target((dict, OrderedDict))
        for key, value in zip(items[::2], items[1::2]):
            target[key] = value

    def op_ADDITEMS(self, _):
        items = self.pop_mark()
        self._target((set,)).update(items)

    # -- globals, calls, state ---------------------------------------------------------------------------------------
    def resolve(self, module: str, name: str):
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.error(f"a global named by {type(module).__name__} / {type(name).__name__}, not strings")
        qualified = f"{module}.{name}"
        if (module, name) in self.builders:  # a Builder, or an immutable value (a torch.dtype, a storage type)
            return self.builders[(module, name)]
        if refused(qualified):
            raise self.error(f"asks for {qualified}, a callable this loader does not build (it builds tensors, storages "
                             "and plain containers; other classes become inert placeholders)", unsafe=True)
        if qualified not in self.placeholders:
            self.placeholders[qualified] = type(name, (Placeholder,), {"_global": qualified,
                                                                       "__module__": "ldm_diffusers.placeholders"})
        return self.placeholders[qualified]

    def op_GLOBAL(self, arg):
        module, _, name = arg.partition(" ")
        self.push(self.resolve(module, name))

    def op_STACK_GLOBAL(self, _):
        name, module = self.pop(), self.pop()
        self.push(self.resolve(module, name))

    def call(self, func, args: tuple, kwargs: dict | None = None, new_object: bool = False):
        if not isinstance(args, tuple) or not isinstance(kwargs or {}, dict):
            raise self.error(f"call arguments are a {type(args).__name__}, not a tuple")
        if isinstance(func, type) and issubclass(func, Placeholder) and func in self.placeholders.values():
            return func(*args, **(kwargs or {}))
        if isinstance(func, Builder) and not kwargs and (func.new_object or not new_object):
            return func.build(*args)
        raise self.error(f"{self.opcode} calls {func!r}, which is not a class or function this loader builds",
                         unsafe=True)

    def op_REDUCE(self, _):
        args, func = self.pop(), self.pop()
        self.push(self.call(func, args))

    def op_NEWOBJ(self, _):
        args, cls = self.pop(), self.pop()
        self.push(self.call(cls, args, new_object=True))

    def op_NEWOBJ_EX(self, _):
        kwargs, args, cls = self.pop(), self.pop(), self.pop()
        self.push(self.call(cls, args, kwargs, new_object=True))

    def op_INST(self, arg):
        module, _, name = arg.partition(" ")
        cls = self.resolve(module, name)
        self.push(self.call(cls, tuple(self.pop_mark()), new_object=True))

    def op_OBJ(self, _):
        items = self.pop_mark()
        if not items:
            raise self.error("OBJ without a class")
        self.push(self.call(items[0], tuple(items[1:]), new_object=True))

    def op_BUILD(self, _):
        state = self.pop()
        target = self.top()
        if isinstance(target, Placeholder) and type(target) in self.placeholders.values():
            target.state = state
            return
        if type(target) is OrderedDict and type(state) is dict:  # a state dict's ``_metadata`` attribute
            clashes = [k for k in state if not isinstance(k, str) or hasattr(OrderedDict, k) or k.startswith("__")]
            if not clashes:
                for key, value in state.items():
                    object.__setattr__(target, key, value)
                return
            raise self.error(f"BUILD would set {clashes[0]!r} on an OrderedDict, shadowing its own attribute",
                             unsafe=True)
        what = target.__name__ if isinstance(target, type) else type(target).__name__
        raise self.error(f"BUILD on {what!s}; only placeholders and OrderedDict attributes take a state", unsafe=True)

    def op_PERSID(self, arg):
        self.push(self.persistent_load(arg))

    def op_BINPERSID(self, _):
        self.push(self.persistent_load(self.pop()))
