"""A corpus of hostile and malformed checkpoints, built here at test time, against ``load_compvis_ckpt``: each case
asserts its exact outcome (loaded, refused as unsafe, or rejected as invalid, with the message naming the problem),
nothing it names is imported or run (a canary), nothing the process already had changes, and memory stays bounded
by the file under a hard limit."""

from __future__ import annotations

import os
import pickle as P
import resource
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers.crafted_checkpoints import (
    APPEND,
    APPENDS,
    BUILD,
    EMPTY_DICT,
    EMPTY_LIST,
    EMPTY_TUPLE,
    FALSE,
    FLOATS,
    MARK,
    NONE,
    PROTO2,
    REDUCE,
    SETITEM,
    SETITEMS,
    STOP,
    TRUE,
    TUPLE,
    call,
    deflate_bomb,
    glob,
    num,
    patch,
    pickled,
    state_dict,
    storage,
    tensor,
    text,
    torch_zip,
    tup,
)

from ldm_diffusers.cli import main
from ldm_diffusers.conversion import (
    CheckpointError,
    Placeholder,
    UnsafeCheckpointError,
    load_compvis_ckpt,
    state_dict_of,
)

UNSAFE, INVALID = "unsafe", "invalid"
ALLOWED_GLOBALS = [("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
                   ("torch._utils", "_rebuild_parameter"), ("torch", "Size"), ("torch", "device"),
                   ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                   ("builtins", "complex"), ("builtins", "bytes"), ("builtins", "bytearray"), ("_codecs", "encode"),
                   ("torch", "FloatStorage"), ("torch", "float32")]
VALID = pickled(state_dict(text("w"), tensor()))


def _tamper_cases():
    """BUILD / SETITEM(S) / APPEND(S) / REDUCE aimed at every global that is returned for real."""
    for module, name in ALLOWED_GLOBALS:
        g, key = glob(module, name), f"{module}.{name}"
        yield f"BUILD {key}", pickled(g, EMPTY_DICT, text("__defaults__"), tup(num(-1)), SETITEM, BUILD), UNSAFE, "BUILD on"
        yield f"SETITEMS {key}", pickled(g, MARK, text("k"), num(1), SETITEMS), UNSAFE, "SETITEMS on"
        yield f"APPENDS {key}", pickled(g, MARK, num(1), APPENDS), UNSAFE, "APPENDS on"
        token = (module, name) in {("torch", "FloatStorage"), ("torch", "float32")}
        yield (f"REDUCE {key}", pickled(g, tup(EMPTY_LIST, EMPTY_LIST, EMPTY_LIST, EMPTY_LIST, EMPTY_LIST), REDUCE),
               UNSAFE if token else INVALID, "calls" if token else "TypeError|not a storage")
    yield "SETITEM torch.Size", pickled(glob("torch", "Size"), text("k"), num(1), SETITEM), UNSAFE, "SETITEM on"
    yield "APPEND OrderedDict", pickled(glob("collections", "OrderedDict"), num(1), APPEND), UNSAFE, "APPEND on"


def _type_confusion_cases():
    od = call(glob("collections", "OrderedDict"))
    yield "OrderedDict BUILD values=list", pickled(od, EMPTY_DICT, text("values"), EMPTY_LIST, SETITEM, BUILD), UNSAFE, "shadowing"
    yield "OrderedDict BUILD tuple state", pickled(od, tup(NONE, EMPTY_DICT), BUILD), UNSAFE, "BUILD on OrderedDict"
    yield "dict BUILD", pickled(EMPTY_DICT, EMPTY_DICT, BUILD), UNSAFE, "BUILD on dict"
    yield "list BUILD", pickled(EMPTY_LIST, EMPTY_DICT, BUILD), UNSAFE, "BUILD on list"
    yield "tensor BUILD", pickled(tensor(), EMPTY_DICT, BUILD), UNSAFE, "BUILD on Tensor"
    yield "placeholder class BUILD", pickled(glob("pkg.mod", "Thing"), EMPTY_DICT, BUILD), UNSAFE, "BUILD on Thing"
    yield "placeholder instance called", pickled(call(glob("pkg.mod", "Thing")), EMPTY_TUPLE, REDUCE), UNSAFE, "calls"
    yield "subclass of a placeholder", pickled(call(glob("builtins", "type"), text("X"), tup(glob("pkg.mod", "T")),
                                                    EMPTY_DICT)), UNSAFE, "builtins.type"
    yield "result is a global", pickled(glob("pkg.mod", "Thing")), INVALID, "result is the global"


def _memory_cases():
    yield "LONG_BINPUT 2**32-1", pickled(EMPTY_DICT, P.LONG_BINPUT + struct.pack("<I", 2**32 - 1)), INVALID, "memo index"
    yield "BINBYTES8 2**40", PROTO2 + P.BINBYTES8 + struct.pack("<Q", 2**40) + b"x" + STOP, INVALID, "malformed"
    yield "BINUNICODE8 2**40", PROTO2 + P.BINUNICODE8 + struct.pack("<Q", 2**40) + b"x" + STOP, INVALID, "malformed"
    yield "BYTEARRAY8 2**40", b"\x80\x05" + P.BYTEARRAY8 + struct.pack("<Q", 2**40) + b"x" + STOP, INVALID, "malformed"
    yield "BINSTRING 2**31-1", PROTO2 + P.BINSTRING + struct.pack("<i", 2**31 - 1) + b"x" + STOP, INVALID, "malformed"
    yield "LONG4 2**31-1", PROTO2 + P.LONG4 + struct.pack("<i", 2**31 - 1) + b"x" + STOP, INVALID, "malformed"
    yield "bytearray(10**10)", pickled(call(glob("builtins", "bytearray"), num(10**9))), INVALID, "bytes from"
    yield "set(range(n))", pickled(call(glob("builtins", "set"), call(glob("builtins", "range"), num(10**9)))), UNSAFE, "builtins.range"
    yield "tuple(range(n))", pickled(call(glob("builtins", "tuple"), EMPTY_LIST)), UNSAFE, "builtins.tuple"
    yield "frozenset(range(n))", pickled(call(glob("builtins", "frozenset"), call(glob("builtins", "range"), num(9)))), UNSAFE, "range"
    yield "a million empty sets", PROTO2 + b"\x95" + struct.pack("<Q", 10**6 + 1) + P.EMPTY_SET * 10**6 + STOP, INVALID, "more objects"
    yield "storage numel 2**40", pickled(state_dict(text("w"), tensor(storage(numel=2**40), size=(1,)))), INVALID, "declares"


def _crash_cases():
    thing = call(glob("pkg.mod", "Thing"))
    yield "placeholder as storage type", pickled(tup(text("storage"), thing, text("0"), text("cpu"), num(4)) + P.BINPERSID), INVALID, "storage record"
    yield "placeholder as storage", pickled(tensor(store=thing)), INVALID, "not a storage"
    yield "placeholder as size", pickled(call(glob("torch._utils", "_rebuild_tensor_v2"), storage(), num(0), thing, tup(num(1)),
                                              FALSE, EMPTY_DICT)), INVALID, "tensor size"
    yield "negative size", pickled(tensor(size=(-1,))), INVALID, "non-negative"
    yield "negative stride", pickled(tensor(size=(2,), stride=(-1,))), INVALID, "non-negative"
    yield "negative offset", pickled(tensor(offset=-3, size=(1,))), INVALID, "non-negative"
    yield "offset past the data", pickled(tensor(offset=4, size=(1,))), INVALID, "needs more than"
    yield "size past the data", pickled(tensor(size=(5,))), INVALID, "needs more than"
    yield "stride past the data", pickled(tensor(size=(2,), stride=(4,))), INVALID, "needs more than"
    yield "size/stride lengths", pickled(tensor(size=(2, 2), stride=(1,))), INVALID, "strides"
    yield "requires_grad int", pickled(tensor(storage(kind="IntStorage"), grad=TRUE)), INVALID, "requires_grad on a torch.int32"
    yield "wrong argument count", pickled(call(glob("torch._utils", "_rebuild_tensor_v2"), storage())), INVALID, "TypeError"
    yield "tensor metadata", pickled(call(glob("torch._utils", "_rebuild_tensor_v2"), storage(), num(0), tup(num(4)), tup(num(1)),
                                          FALSE, EMPTY_DICT, EMPTY_DICT + text("x") + num(1) + SETITEM)), INVALID, "metadata"
    yield "parameter of ints", pickled(call(glob("torch._utils", "_rebuild_parameter"), tensor(storage(kind="IntStorage")),
                                            TRUE, EMPTY_DICT)), INVALID, "requires_grad on a torch.int32 parameter"
    yield "unhashable storage key", pickled(tup(text("storage"), glob("torch", "FloatStorage"), EMPTY_LIST, text("cpu"),
                                                num(4)) + P.BINPERSID), INVALID, "storage record"
    yield "text persistent id", PROTO2 + b"Pstorage\n" + STOP, INVALID, "unknown persistent id"
    yield "unhashable dict key", pickled(EMPTY_DICT, EMPTY_LIST, num(1), SETITEM), INVALID, "unhashable"
    yield "unhashable set item", pickled(call(glob("builtins", "set"), tup(EMPTY_LIST))), INVALID, "unhashable"
    yield "storage typed twice", pickled(tup(tensor(), tensor(storage(kind="IntStorage")))), INVALID, "declared twice"
    yield "missing storage entry", pickled(tensor(storage(key="7"))), INVALID, "no entry data/7"
    yield "no STOP", PROTO2 + EMPTY_DICT, INVALID, "malformed"
    yield "unknown opcode", PROTO2 + b"\xff" + STOP, INVALID, "malformed"
    yield "POP on empty", PROTO2 + P.POP + STOP, INVALID, "stack is empty"
    yield "two values at STOP", pickled(EMPTY_DICT, EMPTY_DICT), INVALID, "STOP with 2 values"
    yield "GET never stored", pickled(P.BINGET + b"\x07"), INVALID, "never stored"
    yield "INT of 5000 digits", PROTO2 + b"I" + b"9" * 5000 + b"\n" + STOP, INVALID, "malformed"
    yield "TUPLE without MARK", pickled(num(1), TUPLE), INVALID, "no MARK"
    yield "DICT odd items", pickled(MARK, num(1), P.DICT), INVALID, "odd number"
    yield "OBJ without class", pickled(MARK, P.OBJ), INVALID, "OBJ without a class"
    yield "NEXT_BUFFER", b"\x80\x05" + P.NEXT_BUFFER + STOP, INVALID, "not used by torch.save"
    yield "protocol 9", b"\x80\x09" + NONE + STOP, INVALID, "unknown pickle protocol"


DANGEROUS = [("os", "system"), ("posix", "system"), ("nt", "system"), ("builtins", "eval"), ("builtins", "exec"),
             ("builtins", "getattr"), ("builtins", "__import__"), ("__builtin__", "open"), ("subprocess", "Popen"),
             ("_posixsubprocess", "fork_exec"), ("_operator", "attrgetter"), ("operator", "methodcaller"),
             ("_functools", "partial"), ("functools", "reduce"), ("copyreg", "_reconstructor"), ("typing", "cast"),
             ("numpy", "load"), ("numpy.lib.npyio", "load"), ("torch", "load"), ("torch.storage", "_load_from_bytes"),
             ("torch.serialization", "load"), ("torch._utils", "_rebuild_parameter_with_state"), ("pickle", "loads"),
             ("_pickle", "loads"), ("collections", "namedtuple"), ("_codecs", "decode"), ("runpy", "_run_code"),
             ("importlib", "import_module"), ("ctypes", "CDLL"), ("webbrowser", "open")]


def _callable_cases(marker: Path):
    for module, name in DANGEROUS:
        yield f"GLOBAL {module}.{name}", pickled(call(glob(module, name), text(f"touch {marker}"))), UNSAFE, f"{module}.{name}"
    system, arg = glob("os", "system"), text(f"touch {marker}")
    yield "STACK_GLOBAL", pickled(text("os"), text("system"), P.STACK_GLOBAL, tup(arg), REDUCE), UNSAFE, "os.system"
    yield "INST", PROTO2 + MARK + arg + b"ios\nsystem\n" + STOP, UNSAFE, "os.system"
    yield "OBJ", pickled(MARK, system, arg, P.OBJ), UNSAFE, "os.system"
    yield "NEWOBJ", pickled(system, tup(arg), P.NEWOBJ), UNSAFE, "os.system"
    yield "NEWOBJ_EX", pickled(system, tup(arg), EMPTY_DICT, P.NEWOBJ_EX), UNSAFE, "os.system"
    yield "NEWOBJ on a builder", pickled(glob("torch", "Size"), tup(), P.NEWOBJ), UNSAFE, "calls torch.Size"
    for ext in (P.EXT1 + b"\x01", P.EXT2 + b"\x01\x00", P.EXT4 + b"\x01\x00\x00\x00"):
        yield f"EXT code {ext[:1]!r}", pickled(ext), UNSAFE, "not used by torch.save"
    nested = P.dumps(0, protocol=2)
    yield "nested pickle", pickled(call(glob("pickle", "loads"), P.SHORT_BINBYTES + bytes([len(nested)]) + nested)), UNSAFE, "pickle.loads"
    yield "nested torch.load", pickled(call(glob("torch", "load"), text("other.ckpt"))), UNSAFE, "torch.load"
    yield "canary import", pickled(call(glob("helpers.canary", "fire"), arg)), "ok", None


def _all_pickle_cases(marker):
    yield from _tamper_cases()
    yield from _type_confusion_cases()
    yield from _memory_cases()
    yield from _crash_cases()
    yield from _callable_cases(marker)


def _check(path: Path, outcome: str, pattern: str | None):
    if outcome == "ok":
        return load_compvis_ckpt(path)
    kind = UnsafeCheckpointError if outcome == UNSAFE else CheckpointError
    with pytest.raises(kind, match=pattern) as caught:
        load_compvis_ckpt(path)
    if outcome == INVALID:
        assert type(caught.value) is CheckpointError
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    return message


def test_the_crafted_valid_file_is_what_torch_itself_reads(tmp_path):
    path = torch_zip(tmp_path / "valid.ckpt", VALID)
    expected = torch.load(path, weights_only=True)["state_dict"]["w"]
    assert torch.equal(expected, torch.tensor([1.0, 2.0, -3.0, 4.5]))
    assert torch.equal(state_dict_of(load_compvis_ckpt(path))["w"], expected)


def test_the_corpus_runs_nothing_changes_nothing_and_fails_clearly(tmp_path):
    """Every pickle case in one process, then: the canary never ran, torch's own functions are untouched, and a
    fresh torch.load and a second load give exactly their tensors."""
    marker = tmp_path / "pwned"
    reference = tmp_path / "reference.pt"
    torch.save({"x": torch.arange(6.0).reshape(2, 3)}, reference)
    defaults = {n: getattr(torch._utils, n).__defaults__ for n in ("_rebuild_tensor_v2", "_rebuild_parameter")}
    cases = list(_all_pickle_cases(marker))
    assert len({c[0] for c in cases}) == len(cases) >= 100
    for i, (case, body, outcome, pattern) in enumerate(cases):
        path = torch_zip(tmp_path / f"case{i}.ckpt", body, {"0": FLOATS})
        try:
            result = _check(path, outcome, pattern)
        except AssertionError as err:
            raise AssertionError(f"case {case!r}: {err}") from err
        if case == "canary import":
            assert isinstance(result, Placeholder) and result.args == (f"touch {marker}",)
    assert not marker.exists() and "helpers.canary" not in sys.modules
    assert {n: getattr(torch._utils, n).__defaults__ for n in defaults} == defaults
    assert torch.equal(torch.load(reference, weights_only=True)["x"], torch.arange(6.0).reshape(2, 3))
    again = state_dict_of(load_compvis_ckpt(torch_zip(tmp_path / "again.ckpt", VALID)))
    assert list(again) == ["w"] and torch.equal(again["w"], torch.tensor([1.0, 2.0, -3.0, 4.5]))


def test_attributes_a_file_gives_a_state_dict_change_nothing(tmp_path):
    od = call(glob("collections", "OrderedDict"))
    meta = EMPTY_DICT + text("_metadata") + EMPTY_DICT + SETITEM
    body = pickled(EMPTY_DICT, text("state_dict"), od, text("w"), tensor(), SETITEM, meta, BUILD, SETITEM)
    state = state_dict_of(load_compvis_ckpt(torch_zip(tmp_path / "meta.ckpt", body)))
    assert type(state) is dict and list(state) == ["w"]
    for bad in (pickled(state_dict(text("w"), num(3))), pickled(state_dict(num(1), tensor())),
                pickled(EMPTY_DICT, text("state_dict"), call(glob("pkg.mod", "Thing")), SETITEM)):
        with pytest.raises(CheckpointError, match="no state dict of tensors"):
            state_dict_of(load_compvis_ckpt(torch_zip(tmp_path / "bad.ckpt", bad)))


def _zip_cases(tmp: Path):
    """Containers whose zip records are wrong, each with its expected message."""
    body = pickled(state_dict(text("w"), tensor()))
    yield "deflated storage", torch_zip(tmp / "deflated.ckpt", body, compression=zipfile.ZIP_DEFLATED), "compressed"
    yield "bzip2 storage", torch_zip(tmp / "bzip2.ckpt", body, compression=zipfile.ZIP_BZIP2), "compressed"
    corrupt = patch(torch_zip(tmp / "corrupt.ckpt", body, {"0": bytes(64)}, zipfile.ZIP_DEFLATED), b"\x63\x60\xa0", b"\xff\xff\xff")
    yield "corrupt deflate", corrupt, "compressed"
    encrypted = torch_zip(tmp / "encrypted.ckpt", body)
    data = bytearray(encrypted.read_bytes())
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = data.find(signature)
        while start >= 0:
            data[start + flag_at] |= 1
            start = data.find(signature, start + 4)
    encrypted.write_bytes(bytes(data))
    yield "encrypted entry", encrypted, "encrypted"
    yield "storage size lie", torch_zip(tmp / "short.ckpt", body, {"0": FLOATS[:12]}), "holds 12 bytes, its record declares 16"
    yield "crc mismatch", patch(torch_zip(tmp / "crc.ckpt", body), FLOATS, FLOATS[:-1] + b"\x00"), "could not be read"
    yield "big-endian", torch_zip(tmp / "big.ckpt", body, byteorder=b"big"), "little-endian"
    yield "huge byteorder", torch_zip(tmp / "order.ckpt", body, byteorder=b"little" * 100), "more than the 16"
    with zipfile.ZipFile(tmp / "nopkl.ckpt", "w") as archive:
        archive.writestr("archive/data/0", FLOATS)
    yield "no data.pkl", tmp / "nopkl.ckpt", "no \\*/data.pkl"
    with zipfile.ZipFile(tmp / "two.ckpt", "w") as archive:
        archive.writestr("a/data.pkl", body)
        archive.writestr("b/data.pkl", body)
    yield "two data.pkl", tmp / "two.ckpt", "no \\*/data.pkl"
    (tmp / "legacy.pt").write_bytes(P.dumps({"a": 1}, protocol=2))
    yield "legacy pickle", tmp / "legacy.pt", "legacy"
    lying = patch(torch_zip(tmp / "central.ckpt", body), struct.pack("<II", 16, 16), struct.pack("<II", 16, 2**31), 2)
    yield "central directory size lie", lying, "compressed|could not be read|holds"


def _safetensors_cases(tmp: Path):
    header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    cases = {"length past the end": struct.pack("<Q", 2**40) + header + FLOATS,
             "offsets past the data": struct.pack("<Q", len(header)) + header.replace(b"16]", b"99]") + FLOATS,
             "not JSON": struct.pack("<Q", 5) + b"{nope" + FLOATS,
             "dtype and bytes disagree": struct.pack("<Q", len(header)) + header.replace(b"F32", b"F64") + FLOATS}
    for i, (case, data) in enumerate(cases.items()):
        (tmp / f"st{i}.safetensors").write_bytes(data)
        yield f"safetensors {case}", tmp / f"st{i}.safetensors", "not a readable safetensors file"


def test_bad_containers_get_one_clear_error(tmp_path):
    cases = list(_zip_cases(tmp_path)) + list(_safetensors_cases(tmp_path))
    for case, path, pattern in cases:
        try:
            _check(path, INVALID, pattern)
        except AssertionError as err:
            raise AssertionError(f"case {case!r}: {err}") from err


def _status_kib(field: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])


def _load_all_in_a_limited_child(paths: list[Path], headroom_mib: int) -> list[str]:
    """Load each path in a forked child whose address space may grow by ``headroom_mib`` only (RLIMIT_AS); returns
    one line per file (the exception type, or LOADED) and the child's peak resident growth in MiB."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery past this point, only os._exit
        lines = []
        try:
            os.close(read_end)
            Path("/proc/self/clear_refs").write_text("5")  # restart the peak-RSS counter (VmHWM) at the current RSS
            start = _status_kib("VmRSS")
            resource.setrlimit(resource.RLIMIT_AS, ((_status_kib("VmSize") + headroom_mib * 1024) * 1024,) * 2)
            for path in paths:
                try:
                    load_compvis_ckpt(path)
                    lines.append("LOADED")
                except BaseException as err:  # noqa: BLE001 - a MemoryError must be reported, not crash the child
                    lines.append(type(err).__name__)
            lines.append(f"GREW_MIB {(_status_kib('VmHWM') - start) // 1024}")
        finally:
            os.write(write_end, "\n".join(lines).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        output = reader.read()
    os.waitpid(pid, 0)
    return output.splitlines()


def test_memory_attacks_fail_clearly_under_a_hard_limit(tmp_path):
    """Each allocation attack in a forked child whose address space may grow by only 256 MiB: every one ends in a
    CheckpointError (no MemoryError), and the child's peak resident memory grows by less than 64 MiB over all."""
    paths = [torch_zip(tmp_path / f"m{i}.ckpt", body) for i, (_, body, _, _) in enumerate(_memory_cases())]
    bomb = deflate_bomb(tmp_path / "bomb.ckpt", 600, VALID)  # 600 MiB of zeros in about 600 KB
    assert bomb.stat().st_size < 2**20
    lines = _load_all_in_a_limited_child([*paths, bomb], 256)
    expected = ["UnsafeCheckpointError" if outcome == UNSAFE else "CheckpointError" for _, _, outcome, _ in _memory_cases()]
    assert lines[:-1] == [*expected, "CheckpointError"], lines
    assert lines[-1].startswith("GREW_MIB") and int(lines[-1].split()[1]) < 64, lines[-1]
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY  # the limit stayed in the child


def test_convert_reports_a_hostile_file_in_one_line_and_writes_nothing(tmp_path, capsys):
    evil = torch_zip(tmp_path / "evil.ckpt", pickled(call(glob("os", "system"), text("true"))))
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  target: ldm.models.autoencoder.AutoencoderKL\n")
    for path in (evil, torch_zip(tmp_path / "short.ckpt", VALID, {"0": FLOATS[:4]})):
        with pytest.raises(SystemExit) as exit_:
            main(["convert", str(path), "--config", str(config), "--output_dir", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert err.startswith("ldm-diffusers convert: ") and str(path) in err
        assert not (tmp_path / "out").exists()
