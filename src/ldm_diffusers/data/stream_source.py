"""Where a stream comes from: a Hub dataset or a local folder of ``.parquet`` / webdataset ``.tar`` shards, resolved
to its shard files, their builder and features, read shard by shard with ``datasets`` streaming; every example
gets a stable index (from the parquet footers' row counts, or shard * ``INDEX_STRIDE`` + row)."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..utils.model_files import missing_local_folder

BUILDERS = {".parquet": "parquet", ".tar": "webdataset"}  # shard suffix -> the datasets module that reads it
INDEX_STRIDE = 1 << 32  # index = shard * INDEX_STRIDE + row where shard lengths are unknown (webdataset)
INDEX_KEY = "__index__"


@dataclass
class StreamShards:
    """A streaming source resolved to its shards: ``builder`` (the ``datasets`` module that reads one shard:
    "parquet" or "webdataset"), ``files`` (local paths or ``hf://`` URLs, in the stream's natural order),
    ``features`` (the columns of a row) and ``lengths`` (rows per shard; None where unknown)."""

    builder: str
    files: list[str]
    features: object  # datasets.Features
    lengths: list[int] | None = None
    name: str = ""
    offsets: list[int] | None = field(init=False, default=None)

    def __post_init__(self):
        if self.lengths is not None:
            self.offsets = [int(v) for v in np.concatenate([[0], np.cumsum(self.lengths)[:-1]])] if self.lengths else []

    @property
    def column_names(self) -> list[str]:
        return list(self.features)

    @property
    def num_rows(self) -> int | None:
        return None if self.lengths is None else int(sum(self.lengths))

    def index(self, shard: int, row: int) -> int:
        """The stable index of row ``row`` of shard ``shard``."""
        return self.offsets[shard] + row if self.offsets is not None else shard * INDEX_STRIDE + row

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps([self.builder, self.files, self.lengths]).encode()).hexdigest()[:16]


def _local_shards(path: Path) -> list[str]:
    files = sorted(str(p) for p in path.rglob("*") if p.suffix in BUILDERS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise FileNotFoundError(f"No .parquet or .tar shards in '{path}' (or its subfolders). --streaming reads "
                                "parquet or webdataset shards; write them with Dataset.to_parquet(...).")
    return files


def _builder_of(files: list[str], where: str) -> str:
    kinds = {BUILDERS.get(os.path.splitext(f.split("::")[0])[1].lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        found = sorted({os.path.splitext(f)[1] or f for f in files})
        raise ValueError(f"{where}: streaming reads shards of one format, .parquet or .tar (webdataset); "
                         f"found {found}.")
    return kinds.pop()


SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation", "test": "test"}


def _split_files(folder: Path, files: list[str], split: str) -> list[str]:
    """The shards of ``split`` in a local folder: those under a ``<split>/`` folder or named ``<split>-*`` /
    ``<split>_*`` ("valid" and "val" count as "validation"); all of them for "train" when no file names a split."""
    def split_of(file: str) -> str | None:
        parts = Path(file).relative_to(folder).parts
        for name, canonical in SPLIT_NAMES.items():
            if name in parts[:-1] or parts[-1].startswith((f"{name}-", f"{name}_", f"{name}.")):
                return canonical
        return None

    named = {f: split_of(f) for f in files}
    if not any(named.values()):
        return files if split == "train" else []
    return [f for f, s in named.items() if s == SPLIT_NAMES.get(split, split)]


def resolve_stream(
    source: str | os.PathLike | list[str],
    split: str = "train",
    config_name: str | None = None,
    data_files=None,
    cache_dir: str | None = None,
    count_rows: bool = True,
) -> StreamShards:
    """The shards of ``split`` of ``source``: a local folder of .parquet / .tar shards (searched recursively; a
    split is told by a ``<split>/`` folder or a ``<split>-`` file-name prefix), a shard file, a glob pattern, a
    list of shard files, or a Hub dataset id (its data files, as ``datasets.load_dataset_builder`` resolves
    them; ``data_files`` / ``config_name`` passed through). Reads no rows: the features come from the first
    shard's schema (parquet) or first examples (webdataset), the row counts from the parquet footers."""
    import datasets

    if isinstance(source, (list, tuple)):
        files, where = [str(f) for f in source], "the shard list"
        if not files:
            raise FileNotFoundError("The list of streaming shards is empty.")
        missing = [f for f in files if "://" not in f and not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"Streaming shard(s) not found: {missing[:5]}")
    elif os.path.isdir(source):
        folder = Path(source)
        files, where = _split_files(folder, _local_shards(folder), split), str(source)
        if not files:
            raise FileNotFoundError(f"No shards of the '{split}' split in '{source}'.")
    elif os.path.isfile(source):
        files, where = [str(source)], str(source)
    elif glob.has_magic(str(source)):
        files, where = sorted(glob.glob(str(source), recursive=True)), str(source)
        if not files:
            raise FileNotFoundError(f"No shards match '{source}'.")
    elif missing_local_folder(str(source)):
        raise FileNotFoundError(f"'{source}' does not exist (and is no Hub dataset id): no streaming shards there.")
    else:  # a Hub dataset id
        builder = datasets.load_dataset_builder(str(source), config_name, data_files=data_files, cache_dir=cache_dir)
        found = builder.config.data_files or {}
        if split not in found:
            raise ValueError(f"The dataset '{source}' has no '{split}' split to stream (it has {sorted(found)}).")
        files, where = [str(f) for f in found[split]], str(source)
    kind = _builder_of(files, where)
    first = datasets.load_dataset(kind, data_files=[files[0]], split="train", streaming=True, cache_dir=cache_dir)
    lengths = _parquet_lengths(files) if kind == "parquet" and count_rows else None
    return StreamShards(kind, files, first.features, lengths, name=where)


def _parquet_lengths(files: list[str]) -> list[int]:
    """Rows per parquet shard, from the footers (read concurrently for remote shards)."""
    import fsspec
    import pyarrow.parquet as pq

    def rows(file: str) -> int:
        with fsspec.open(file, "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows

    remote = any("://" in f for f in files)
    if not remote:
        return [pq.read_metadata(f).num_rows for f in files]
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(rows, files))


def shard_examples(shards, builder: str, features, max_samples: int | None, exclude: frozenset) -> Iterator[dict]:
    """``from_generator``'s generator: the rows of each (shard number, file, offset) of ``shards`` in order, their
    images still encoded, each with its stable index."""
    import datasets

    for shard, file, offset in shards:
        if max_samples is not None and offset is not None and offset >= max_samples:
            continue
        rows = datasets.load_dataset(builder, data_files=[file], split="train", streaming=True, features=features)
        for row_number, row in enumerate(rows.decode(False)):
            index = offset + row_number if offset is not None else shard * INDEX_STRIDE + row_number
            if max_samples is not None and index >= max_samples:
                break
            if index in exclude:
                continue
            row[INDEX_KEY] = index
            yield row


def decodable(feature) -> bool:
    return (dataclasses.is_dataclass(feature) and getattr(feature, "decode", False)
            and hasattr(feature, "decode_example"))


def encoded_features(features):
    """``features`` with images (and other decodable columns) left encoded, plus the index column."""
    from datasets import Features, Value

    out = {name: dataclasses.replace(f, decode=False) if decodable(f) else f for name, f in features.items()}
    return Features({**out, INDEX_KEY: Value("int64")})
