"""Latent caching: encode the training set once with the frozen stage-1 encoder (and a frozen text encoder)
and train from the cache.

For a KL autoencoder the cache keeps the posterior's mean and standard deviation, not one sample: the training
loop draws z = mean + std * eps with the same per-example noise it would use on pixels, so training from the
cache is the same computation as training on pixels, only without the encoder. VQ models cache their
pre-quantisation latents. Tensors the conditioning derives from the pixels (the low-resolution image for
super-resolution), segmentation maps and the frozen text encoder's tokens (float16) are cached too; data
augmentation (random crops, flips) is frozen at caching time, drawn per row from (cache key, row index).

On disk a cache is the folder ``<cache_dir>/<key>``, where the key hashes everything the cache depends on
(stage-1 weights, dataset fingerprint, resolution, augmentation, conditioning columns, text encoder)::

    latent_cache_info.json          the manifest: settings, rows, shards with their files' sizes, columns
    shard-00000/                    rows [0, shard_rows)
        latent_mean.npy ...         one .npy array per tensor column, [rows, ...] (plus index.npy, class_labels.npy)
        rows.json                   the other columns (prompts, layouts) as lists
        shard.json                  what the shard holds (written last: a shard without it is unfinished)
    shard-00001/ ...

Shards are fixed blocks of ``shard_rows`` dataset rows, so the folder is the same whatever the process count:
with ``world_size`` processes, rank r encodes the shards r, r + world_size, ... in parallel with the others. All
of them write into the hidden folder ``.<key>.tmp-build``; each shard appears there whole (written aside, then
renamed), and the main process writes the manifest once every shard is there and renames the folder into place.
A build killed half-way keeps its finished shards: the next build with the same key encodes only the missing
ones. A published cache is reused when every file the manifest lists is there with its size (and the arrays'
row counts agree); otherwise it is rebuilt (``cache_problem`` says why).

Reading: :class:`LatentCacheDataset`, a map-style ``torch.utils.data.Dataset`` over all shards that opens the
arrays with ``np.load(mmap_mode="r")``: a row is a few slices of memory-mapped arrays (the page cache does the
rest), never a per-row decode. Its rows have the keys the training loop reads (``latent_mean`` / ``latent_std``
or ``latents``, ``context``, ``low_res``, ``segmentation_map`` as tensors; ``index`` and ``class_labels`` as
ints; ``prompt`` / ``layout`` as stored), so ``collate_examples`` batches them as it batches pixel rows.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import random
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.transforms import collate_examples
from ..models.autoencoders import encode_latent_moments
from ..utils.model_files import discard_directory, publish_directory

logger = logging.getLogger(__name__)

INFO_FILE = "latent_cache_info.json"  # the manifest; a folder without it was never finished
SHARD_FILE = "shard.json"
ROWS_FILE = "rows.json"
FORMAT = 2  # 1: one datasets Arrow table (before the sharded, memory-mapped format)
DEFAULT_SHARD_ROWS = 4096
INT_COLUMNS = ("index", "class_labels")  # stored as int64 arrays, read back as Python ints (as datasets did)
STALE_PATTERNS = (".*.tmp-*", ".*.old-*", ".*.trash-*")  # what utils.checkpoints leaves behind when killed


def weights_digest(*modules: torch.nn.Module | None) -> str:
    """A short hash of the modules' weights (a cache made with other weights is never reused)."""
    digest = hashlib.sha1()
    for module in modules:
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- reading ------------------------------------------------------------------------------------------
class LatentCacheDataset(torch.utils.data.Dataset):
    """The rows of a published cache folder, read from memory-mapped ``.npy`` shards.

    ``dataset[i]``: one row (a dict); ``dataset[a:b]`` / ``dataset[:]``: the rows' columns, tensors stacked
    (as ``datasets`` answers a slice); ``__getitems__`` (which the ``DataLoader`` calls with a batch's indices)
    reads each shard's part of a batch with one fancy-indexed slice. Arrays are opened lazily in each process
    (a ``DataLoader`` worker opens its own maps; pickling the dataset never copies them)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.info = json.loads((self.path / INFO_FILE).read_text())
        if self.info.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not a latent cache of format {FORMAT}: {cache_problem(self.path)}")
        self.shards = self.info["shards"]
        self.starts = [shard["start"] for shard in self.shards]
        self.num_rows = int(self.info["rows"])
        self.array_columns = list(self.info["arrays"])
        self.list_columns = list(self.info["lists"])
        self._arrays: dict[int, dict[str, np.ndarray]] = {}
        self._lists: dict[int, dict[str, list]] = {}

    @property
    def column_names(self) -> list[str]:
        return self.array_columns + self.list_columns

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self):
        return {**self.__dict__, "_arrays": {}, "_lists": {}}

    def shard_arrays(self, s: int) -> dict[str, np.ndarray]:
        """Shard ``s``'s arrays, memory-mapped (``np.memmap``), opened on first use."""
        if s not in self._arrays:
            folder = self.path / self.shards[s]["name"]
            self._arrays[s] = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in self.array_columns}
        return self._arrays[s]

    @property
    def arrays(self) -> dict[str, list[np.ndarray]]:
        """{column: [its memory-mapped array in each shard]}."""
        per_shard = [self.shard_arrays(s) for s in range(len(self.shards))]
        return {name: [arrays[name] for arrays in per_shard] for name in self.array_columns}

    def _shard_lists(self, s: int) -> dict[str, list]:
        if s not in self._lists:
            file = self.path / self.shards[s]["name"] / ROWS_FILE
            self._lists[s] = json.loads(file.read_text()) if self.list_columns else {}
        return self._lists[s]

    def _locate(self, i: int) -> tuple[int, int]:
        if not -self.num_rows <= i < self.num_rows:
            raise IndexError(f"row {i} of a latent cache of {self.num_rows} rows")
        i %= self.num_rows
        s = bisect.bisect_right(self.starts, i) - 1
        return s, i - self.starts[s]

    @staticmethod
    def _value(name: str, array: np.ndarray):
        if name in INT_COLUMNS:
            return int(array)
        tensor = torch.from_numpy(array)
        return tensor.long() if name == "segmentation_map" else tensor

    def _rows(self, s: int, positions: list[int]) -> list[dict]:
        """Rows ``positions`` of shard ``s``: one fancy-indexed read per column (a copy in memory: the map is
        read-only), of which each row is a view."""
        arrays, lists = self.shard_arrays(s), self._shard_lists(s)
        where = np.asarray(positions)
        taken = {name: np.asarray(array[where]) for name, array in arrays.items()}
        rows = []
        for k, j in enumerate(positions):
            row = {name: self._value(name, value[k]) for name, value in taken.items()}
            row.update({name: values[j] for name, values in lists.items()})
            rows.append(row)
        return rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._columns(range(*i.indices(self.num_rows)))
        s, j = self._locate(int(i))
        return self._rows(s, [j])[0]

    def __getitems__(self, indices) -> list[dict]:
        located = [self._locate(int(i)) for i in indices]
        out: list[dict | None] = [None] * len(located)
        by_shard: dict[int, list[int]] = {}
        for k, (s, _) in enumerate(located):
            by_shard.setdefault(s, []).append(k)
        for s, ks in by_shard.items():
            for k, row in zip(ks, self._rows(s, [located[k][1] for k in ks])):
                out[k] = row
        return out

    def _columns(self, indices) -> dict:
        rows = self.__getitems__(list(indices))
        if not rows:
            return {name: [] for name in self.column_names}
        batch = collate_examples(rows)
        return {name: (value.tolist() if name in INT_COLUMNS else value) for name, value in batch.items()}


def load_latent_cache(path: str | Path) -> LatentCacheDataset:
    """A published cache folder as a dataset (``ValueError`` saying why when it cannot be trained on)."""
    problem = cache_problem(Path(path))
    if problem is not None:
        raise ValueError(f"The latent cache {path} is unusable: {problem}.")
    return LatentCacheDataset(path)


def _file_problem(folder: Path, files: dict[str, int], label: str) -> str | None:
    for name, size in files.items():
        file = folder / name
        if not file.is_file():
            return f"{label}/{name} is missing"
        if file.stat().st_size != size:
            return f"{label}/{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def _arrays_problem(folder: Path, names, rows: int, label: str) -> str | None:
    for name in names:
        try:
            found = np.load(folder / f"{name}.npy", mmap_mode="r").shape[0]
        except Exception as err:  # numpy raises several types for damaged headers
            return f"{label}/{name}.npy does not load ({type(err).__name__}: {err})"
        if found != rows:
            return f"{label}/{name}.npy has {found} rows, {rows} were written"
    return None


def cache_problem(path: Path) -> str | None:
    """Why the cache folder ``path`` cannot be trained on (None if it is whole): no complete manifest (the build
    never finished), an older format, a shard missing, a file missing or of another size than when it was
    written, or arrays whose row counts disagree with the manifest."""
    path = Path(path)
    try:
        info = json.loads((path / INFO_FILE).read_text())
    except (OSError, ValueError) as err:
        return f"no complete {INFO_FILE}: {err}"
    if not isinstance(info, dict) or info.get("format", 1) != FORMAT:
        return (f"it was written in format {info.get('format', 1) if isinstance(info, dict) else '?'} (1: one Arrow "
                f"table), this version reads format {FORMAT} (memory-mapped .npy shards)")
    try:
        shards, rows, arrays = info["shards"], info["rows"], info["arrays"]
    except KeyError as err:
        return f"no complete {INFO_FILE}: {err} is missing"
    counted = 0
    try:
        for shard in shards:
            folder = path / shard["name"]
            if not folder.is_dir():
                return f"{shard['name']} is missing"
            problem = _file_problem(folder, shard["files"], shard["name"]) or _arrays_problem(
                folder, arrays, shard["rows"], shard["name"])
            if problem:
                return problem
            if shard["start"] != counted:
                return f"{shard['name']} starts at row {shard['start']}, not {counted}"
            counted += shard["rows"]
    except (KeyError, TypeError) as err:
        return f"no complete {INFO_FILE}: a shard entry lacks {err}"
    return None if counted == rows else f"its shards hold {counted} rows, {rows} were written"


# -- writing ------------------------------------------------------------------------------------------
class _SeededRows(torch.utils.data.Dataset):
    """Rows ``start..stop`` of ``dataset``, each fetched with Python's ``random`` seeded by (``seed``, row): the
    random crops and flips of ``example_transform`` are frozen per row, the same whichever process caches the
    row; the caller's ``random`` state is left as it was."""

    def __init__(self, dataset, start: int, stop: int, seed: int):
        self.dataset, self.start, self.stop, self.seed = dataset, start, stop, seed

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, k):
        i = self.start + k
        state = random.getstate()
        random.seed(int(np.random.SeedSequence([self.seed, i]).generate_state(1)[0]))
        try:
            return self.dataset[i]
        finally:
            random.setstate(state)


def _encode_rows(loader, vae, mode, columns, context, progress) -> tuple[dict[str, list], dict[str, list]]:
    arrays: dict[str, list[np.ndarray]] = {}
    lists: dict[str, list] = {}
    for batch in loader:
        found = encode_latent_moments(vae, batch["pixel_values"])
        found.update(mode.cache_inputs(batch, columns))
        if context is not None:
            found["context"] = context(batch).half()
        for name, value in found.items():
            arrays.setdefault(name, []).append(value.cpu().numpy())
        for name, value in batch.items():
            if name == "pixel_values":
                continue
            if isinstance(value, torch.Tensor):
                arrays.setdefault(name, []).append(value.numpy())
            else:
                lists.setdefault(name, []).extend(value)
        progress.update(len(batch["pixel_values"]))
    return arrays, lists


def _storage(name: str, array: np.ndarray, latent_dtype: str | None) -> np.ndarray:
    if name == "segmentation_map":  # class ids: the smallest integer type that holds them (read back as int64)
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dtype in (np.uint8, np.int16, np.int32):
            if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
                return array.astype(dtype)
        return array.astype(np.int64)
    if name in INT_COLUMNS:
        return array.astype(np.int64)
    if latent_dtype is not None and name in ("latent_mean", "latent_std", "latents"):
        return array.astype(latent_dtype)
    return array


def _plain(value):
    """JSON for the NumPy / torch values a non-tensor column may hold."""
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        return value.tolist()
    raise TypeError(f"Cannot cache a value of type {type(value).__name__} in a list column.")


def _write_shard(staging: Path, name: str, build: dict, arrays: dict[str, np.ndarray], lists: dict[str, list]) -> None:
    """One shard folder, written aside and renamed into ``staging`` (``shard.json`` last: a shard folder without
    it was never finished)."""
    tmp = staging / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    for column, array in arrays.items():
        np.save(tmp / f"{column}.npy", np.ascontiguousarray(array))
    (tmp / ROWS_FILE).write_text(json.dumps(lists, default=_plain))
    files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
    (tmp / SHARD_FILE).write_text(json.dumps({**build, "files": files}, indent=1))
    publish_directory(tmp, staging / name)


def _finished_shard(folder: Path, build: dict) -> dict | None:
    """The shard.json of a finished shard written for ``build`` whose files are all there, else None."""
    try:
        info = json.loads((folder / SHARD_FILE).read_text())
    except (OSError, ValueError):
        return None
    if {k: info.get(k) for k in build} != build or _file_problem(folder, info.get("files", {}), folder.name):
        return None
    return info


def _remove_stale(folder: Path, keep: Path | None = None) -> None:
    """Delete what killed writers left in ``folder`` (hidden temporary folders), except ``keep``."""
    if not folder.is_dir():
        return
    for pattern in STALE_PATTERNS:
        for path in folder.glob(pattern):
            if keep is not None and path == keep:
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def shard_layout(rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """The [start, stop) row range of each shard of a cache of ``rows`` rows."""
    return [(start, min(start + shard_rows, rows)) for start in range(0, rows, shard_rows)]


def _no_barrier() -> None:
    return None


@torch.no_grad()
def build_latent_cache(
    dataset,
    vae,
    mode,
    columns,
    cache_dir: str | Path,
    settings: dict,
    context: Callable | None = None,
    batch_size: int = 32,
    show_progress: bool = True,
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    latent_dtype: str | None = None,
    num_workers: int = 0,
) -> LatentCacheDataset:
    """Encode ``dataset`` (a map-style dataset of rows with ``pixel_values``, ``index`` and the mode's inputs)
    once and return the cache as a :class:`LatentCacheDataset`; reuse it when ``settings`` match.

    ``context``: ``fn(batch) -> tokens`` of a frozen encoder (the mode's ``frozen_context``), cached as ``context``.

    Several processes build one cache together: call this on every process with its ``rank``, the
    ``world_size`` and a ``barrier`` that waits for all of them (``accelerator.wait_for_everyone``), not inside
    ``main_process_first``. Rank r encodes the shards r, r + world_size, ... (``shard_rows`` rows each); rank 0
    cleans up, writes the manifest and publishes the folder. ``cache_dir`` must be a folder every process sees.
    With the defaults (one process) it needs no barrier. ``latent_dtype`` ("float16"): store the latent moments
    in that type (half the disk and page cache; training then reads rounded moments). ``num_workers``: data
    loader workers that decode and transform the rows being encoded."""
    _check_build(mode, rank, world_size, barrier, shard_rows)
    barrier = barrier or _no_barrier
    key = cache_key(settings if latent_dtype is None else {**settings, "latent_dtype": latent_dtype})
    cache_dir = Path(cache_dir)
    path = cache_dir / key
    problem = cache_problem(path) if path.exists() else "it does not exist"
    if problem is None:
        logger.info("Using the latent cache %s.", path)
        return LatentCacheDataset(path)
    if path.exists() and rank == 0:
        logger.warning("The latent cache %s is unusable (%s): rebuilding it.", path, problem)

    rows = len(dataset)
    if rows == 0:
        raise ValueError("The dataset to cache has no rows.")
    layout = shard_layout(rows, shard_rows)
    names = [f"shard-{s:05d}" for s in range(len(layout))]
    staging = cache_dir / f".{key}.tmp-build"
    build = {"key": key, "rows": rows, "shard_rows": shard_rows}
    barrier()  # every process has looked at the old folder before anyone touches it
    if rank == 0:
        _prepare_staging(cache_dir, path, staging, build, layout, names)
    barrier()

    seed = int(key, 16)
    mine = [s for s in range(rank, len(layout), world_size) if not (staging / names[s]).exists()]
    progress = tqdm(total=sum(layout[s][1] - layout[s][0] for s in mine), desc="caching latents",
                    disable=not show_progress)
    for s in mine:
        start, stop = layout[s]
        loader = torch.utils.data.DataLoader(
            _SeededRows(dataset, start, stop, seed), batch_size=batch_size, collate_fn=collate_examples,
            num_workers=num_workers, generator=torch.Generator(),  # the global torch RNG is left alone
        )
        arrays, lists = _encode_rows(loader, vae, mode, columns, context, progress)
        joined = {name: _storage(name, np.concatenate(parts), latent_dtype) for name, parts in arrays.items()}
        _write_shard(staging, names[s], {**build, "start": start, "stop": stop}, joined, lists)
    progress.close()
    barrier()  # every shard is written

    if rank == 0:
        _publish(staging, path, settings, build, layout, names)
        logger.info("Cached %d latents in %s (%d shard%s, %d process%s).", rows, path, len(layout),
                    "s" if len(layout) > 1 else "", world_size, "es" if world_size > 1 else "")
    barrier()  # the manifest is there
    problem = cache_problem(path)
    if problem is not None:
        raise RuntimeError(f"The latent cache {path} built by {world_size} process(es) is unusable: {problem}.")
    return LatentCacheDataset(path)


def _check_build(mode, rank: int, world_size: int, barrier, shard_rows: int) -> None:
    if not mode.cacheable:
        raise ValueError(
            f"The {mode.name} mode cannot train from a latent cache: every step draws a new random mask and "
            "needs a fresh stage-1 encoding of the masked image. Drop --cache_latents."
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size}).")
    if world_size > 1 and barrier is None:
        raise ValueError("Building a latent cache on several processes needs a barrier "
                         "(accelerator.wait_for_everyone).")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be positive, not {shard_rows}.")


def _prepare_staging(cache_dir: Path, path: Path, staging: Path, build: dict, layout, names) -> None:
    """On rank 0: the unusable old cache removed, the staging folder ready, an interrupted build's finished
    shards kept and everything else in it removed."""
    if path.exists():
        discard_directory(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(cache_dir, keep=staging)  # folders of other builds that were killed half-way
    staging.mkdir(exist_ok=True)
    _remove_stale(staging)  # shards this build's killed predecessor left half-written
    kept = 0
    for s, name in enumerate(names):
        if (staging / name).exists():
            if _finished_shard(staging / name, {**build, "start": layout[s][0], "stop": layout[s][1]}) is None:
                shutil.rmtree(staging / name)
            else:
                kept += 1
    for extra in {p.name for p in staging.iterdir()} - set(names):
        shutil.rmtree(staging / extra) if (staging / extra).is_dir() else (staging / extra).unlink()
    if kept:
        logger.info("Reusing %d finished shard(s) of an interrupted build of %s.", kept, path)


def _publish(staging: Path, path: Path, settings: dict, build: dict, layout, names) -> None:
    shards, arrays, lists = [], None, None
    for (start, stop), name in zip(layout, names):
        info = _finished_shard(staging / name, {**build, "start": start, "stop": stop})
        if info is None:
            raise RuntimeError(f"The latent cache build in {staging} lacks {name} (rows {start}..{stop - 1}): a "
                               "process failed to write it. Run again: finished shards are kept.")
        shards.append({"name": name, "start": start, "rows": stop - start, "files": info["files"]})
        if arrays is None and stop > start:
            folder = staging / name
            arrays = {}
            for file in sorted(folder.glob("*.npy")):
                array = np.load(file, mmap_mode="r")
                arrays[file.stem] = {"dtype": str(array.dtype), "shape": list(array.shape[1:])}
            lists = sorted(json.loads((folder / ROWS_FILE).read_text()))
    manifest = {"format": FORMAT, "settings": settings, "rows": build["rows"], "shard_rows": build["shard_rows"],
                "arrays": arrays or {}, "lists": lists or [], "shards": shards}
    (staging / INFO_FILE).write_text(json.dumps(manifest, indent=1, default=str))
    publish_directory(staging, path)
