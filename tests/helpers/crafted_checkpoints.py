"""Hand-made pickles and torch zip containers for the hostile-checkpoint tests: opcodes written byte by byte, zips
through the stdlib ``zipfile`` (or patched after writing), nothing from ``pickle.dumps`` of live objects."""

from __future__ import annotations

import pickle as P
import struct
import zipfile
import zlib
from pathlib import Path

PROTO2 = b"\x80\x02"
FALSE, TRUE, NONE = P.NEWFALSE, P.NEWTRUE, P.NONE
MARK, TUPLE, REDUCE, BUILD, STOP = P.MARK, P.TUPLE, P.REDUCE, P.BUILD, P.STOP
EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE = P.EMPTY_DICT, P.EMPTY_LIST, P.EMPTY_TUPLE
SETITEM, SETITEMS, APPEND, APPENDS = P.SETITEM, P.SETITEMS, P.APPEND, P.APPENDS
PREFIX = "archive"


def glob(module: str, name: str) -> bytes:
    """GLOBAL module name."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(value: str) -> bytes:
    data = value.encode()
    return P.BINUNICODE + struct.pack("<I", len(data)) + data


def num(value: int) -> bytes:
    """BININT for 32-bit values, LONG1 beyond."""
    if -2**31 <= value < 2**31:
        return P.BININT + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return P.LONG1 + bytes([len(data)]) + data


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + REDUCE


def pickled(*body: bytes) -> bytes:
    """A protocol-2 pickle of ``body`` (one value left on the stack) and STOP."""
    return PROTO2 + b"".join(body) + STOP


def storage(key: str = "0", numel: int = 4, kind: str = "FloatStorage") -> bytes:
    """A persistent storage record, as torch.save writes it."""
    return tup(text("storage"), glob("torch", kind), text(key), text("cpu"), num(numel)) + P.BINPERSID


def tensor(store: bytes | None = None, offset: int = 0, size=(4,), stride=(1,), grad: bytes = FALSE) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())."""
    return call(glob("torch._utils", "_rebuild_tensor_v2"), store if store is not None else storage(), num(offset),
                tup(*map(num, size)), tup(*map(num, stride)), grad, call(glob("collections", "OrderedDict")))


def state_dict(*items: bytes) -> bytes:
    """{"state_dict": {items...}}; items alternate key and value pickles."""
    return EMPTY_DICT + text("state_dict") + EMPTY_DICT + MARK + b"".join(items) + SETITEMS + SETITEM


FLOATS = struct.pack("<4f", 1.0, 2.0, -3.0, 4.5)


def torch_zip(path: Path, body: bytes, entries: dict | None = None, compression: int = zipfile.ZIP_STORED,
              byteorder: bytes = b"little") -> Path:
    """A torch.save-style zip: ``archive/data.pkl`` = ``body``, ``archive/byteorder``, ``archive/data/<key>``
    entries (default: one storage "0" of four floats)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{PREFIX}/data.pkl", body)
        archive.writestr(f"{PREFIX}/byteorder", byteorder)
        archive.writestr(f"{PREFIX}/version", b"3\n")
        for key, data in (entries if entries is not None else {"0": FLOATS}).items():
            archive.writestr(f"{PREFIX}/data/{key}", data, compress_type=compression)
    return path


def patch(path: Path, find: bytes, replace: bytes, count: int = 1) -> Path:
    """Replace bytes in a written file (to make its zip records lie)."""
    data = path.read_bytes()
    assert data.count(find) >= count, find
    path.write_bytes(data.replace(find, replace, count))
    return path


def deflate_bomb(path: Path, mebibytes: int, body: bytes) -> Path:
    """A torch zip whose storage entry ``data/0`` is ``mebibytes`` MiB of zeros deflated (about 1 KB per MiB), with
    ``body`` as its stored data.pkl. Written by hand: one fully flushed deflate block of a MiB of zeros repeated,
    so nothing of that size is ever held or compressed here."""
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = block.compress(bytes(2**20)) + block.flush(zlib.Z_FULL_FLUSH)
    stream = chunk * mebibytes + b"\x03\x00"  # an empty final block ends the stream
    crc, zeros = 0, bytes(2**20)
    for _ in range(mebibytes):
        crc = zlib.crc32(zeros, crc)
    entries = [(f"{PREFIX}/data.pkl", body, 0, zlib.crc32(body), len(body)),
               (f"{PREFIX}/data/0", stream, 8, crc, mebibytes * 2**20)]
    out, directory = bytearray(), bytearray()
    for name, payload, method, checksum, size in entries:
        fields = struct.pack("<HHHHHIII", 20, 0, method, 0, 0, checksum, len(payload), size)
        directory += (b"PK\x01\x02" + struct.pack("<H", 20) + fields
                      + struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, len(out)) + name.encode())
        out += b"PK\x03\x04" + fields + struct.pack("<HH", len(name), 0) + name.encode() + payload
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(directory), len(out), 0)
    path.write_bytes(bytes(out + directory + end))
    return path
