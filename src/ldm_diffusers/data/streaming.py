"""Training from a dataset that is never fully downloaded: a ``datasets`` streaming source (a Hub dataset, or
local parquet / webdataset ``.tar`` shards), read shard by shard, transformed like the map-style rows, split
across processes, shuffled per epoch, and resumable at exactly the next example.

The pieces, from the data to the training loop::

    shards = resolve_stream("user/images")              # or a folder, a file, a glob or a list of shards
    stream = ImageStream(shards, transform, ["image", "text"], seed=0, rank=r, world_size=w, shuffle_buffer=1000)
    loader = StreamingLoader(stream, batch_size=16, num_workers=4)      # an iterable of collated batches
    accelerator.register_for_checkpointing(StreamCheckpoint(loader, rank=r, world_size=w))
    for batch in loader: ...                                              # loader.epoch: the batch's epoch

(:func:`streaming_loader` does the first three lines for the training script's transform.)

**Index.** Every example carries ``index``: its position in the full, unsharded, unshuffled stream (the shards in
their sorted order, row by row), so every per-example random draw seeded by (seed, epoch, index) is the same
whatever the process count and the shuffle. Parquet shards give their row counts in their footers (read once, a
few KB per shard); the rows of webdataset ``.tar`` shards cannot be counted without reading them, so there the
index is ``shard * 2**32 + row``: as stable, only not contiguous.

**Sharding across processes.** Epoch e's stream is the shards in an order permuted by (seed, e), wrapped as a
``datasets.IterableDataset`` (``IterableDataset.from_generator`` over the shard list; each shard is opened with
``datasets.load_dataset(<parquet|webdataset>, data_files=[shard], streaming=True)``, its images left encoded
until they are used) and split with ``datasets.distributed.split_dataset_by_node(ds, rank, world_size)``: whole
shards per process when their count divides by the process count (each process then reads only its shards),
every world_size-th example otherwise (correct, but every process reads every shard: prefer a shard count that
is a multiple of the process count). The processes' parts are disjoint and together hold the whole set.

**Shuffle, and why not ``ds.shuffle(seed, buffer_size)``.** ``datasets``' ``IterableDataset.state_dict()`` /
``load_state_dict()`` (both in the installed datasets 5.x) resume the *source* exactly, but its shuffle buffer
is not part of the state: "examples from shuffle buffers are lost when resuming and the buffers are refilled"
(its docstring). So the buffer here is a block shuffle: the rows are read ``shuffle_buffer`` at a time and each
block is yielded in an order permuted by (seed, epoch, rank, block). Its state is the source's ``state_dict()``
at the start of the block, the block number and the rows of the block already handed out: a resume re-reads
one block (raw rows, not decoded) and continues at exactly the next example. Mixing: rows are mixed within a
block, and shards are visited in a new order each epoch; shards that each hold a random sample of the data (as
Hub image shards do) need nothing more, sorted shards need a block of a few shards' rows.

**Epochs.** Each process's stream is endless: when its part of epoch e ends it continues with epoch e + 1
(whose shard order differs). Batches never straddle two epochs: the last rows of an epoch that do not fill a
batch are dropped (as ``drop_last``), so every batch has one epoch, :attr:`StreamingLoader.epoch`. Processes
move on independently (their parts can differ in length); training ends at ``--max_train_steps``.

**The DataLoader.** :class:`StreamingLoader` *is* the data loader. A ``torch.utils.data.DataLoader`` with worker
processes would keep the stream's position inside the workers, where ``accelerator.save_state`` cannot see it:
``DataLoaderConfiguration(use_stateful_dataloader=True)`` swaps in torchdata's ``StatefulDataLoader``, which
fetches the workers' ``state_dict()``s, but torchdata is not installed here (accelerate then raises ImportError)
and even with it the datasets shuffle buffer is lost on resume. Instead the stream is read in one background
thread and ``num_workers`` threads decode and transform the rows (PIL's decoding and resizing release the GIL),
in order; batches are collated (and pinned, ``pin_memory``) ``prefetch_batches`` ahead. Each batch travels with
the stream state after its last row, so the state handed to a checkpoint is exactly that of the batches the
loop has taken, however far the threads have read ahead. Do not pass the loader to ``accelerator.prepare`` (it
would wrap it in ``IterableDatasetShard`` or dispatch batches from process 0, reading every example on every
process): it is already split; move batches to the device in the loop. Do not ``skip_first_batches`` it either:
``load_state_dict`` already puts it at the next batch.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
import torch
from accelerate.utils import gather_object

from .stream_source import INDEX_KEY, StreamShards, decodable, encoded_features, resolve_stream, shard_examples
from .transforms import collate_examples, example_transform, image_column_of

logger = logging.getLogger(__name__)



# -- one process's stream of examples ------------------------------------------------------------------------
class ImageStream:
    """One process's part of a streaming source, epoch after epoch: rows transformed like the map-style path's
    (``transform``: an ``example_transform`` function of a batch dict and per-row ``random.Random``s), each with
    ``index``. See the module docstring for the index, the split, the block shuffle and the state.

    ``input_columns``: the columns ``transform`` reads (their images are decoded just before it runs).
    ``shuffle_buffer``: rows per shuffled block (0 or 1: no shuffle within blocks); ``shuffle=False`` also keeps
    the shards in order. ``max_samples``: only rows with index < max_samples (parquet). ``exclude``: indices to
    leave out (rows held out for validation)."""

    def __init__(self, shards: StreamShards, transform: Callable, input_columns: list[str], *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000, shuffle: bool = True,
                 max_samples: int | None = None, exclude=()):
        missing = [c for c in input_columns if c not in shards.features]
        if missing:
            raise ValueError(f"The stream {shards.name} has no column(s) {missing}; its columns are "
                             f"{shards.column_names}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size}).")
        if max_samples is not None and shards.offsets is None:
            raise ValueError("max_samples needs shards whose row counts are known (parquet), not webdataset shards.")
        if world_size > 1 and len(shards.files) % world_size:
            logger.warning("%d shards do not divide among %d processes: each process reads every shard and keeps "
                           "every %d-th row. Write a multiple of %d shards to read each shard once.",
                           len(shards.files), world_size, world_size, world_size)
        self.shards, self.transform, self.input_columns = shards, transform, list(input_columns)
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.shuffle, self.shuffle_buffer = shuffle, max(1, int(shuffle_buffer or 1))
        self.max_samples, self.exclude = max_samples, frozenset(int(i) for i in exclude)
        self._encoded_features = encoded_features(shards.features)

    def config(self) -> dict:
        """What a saved state is only valid for."""
        return {"shards": self.shards.fingerprint(), "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
                "max_samples": self.max_samples, "exclude": len(self.exclude)}

    def shard_order(self, epoch: int) -> list[int]:
        n = len(self.shards.files)
        if not self.shuffle:
            return list(range(n))
        return [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(n)]

    def epoch_source(self, epoch: int):
        """This process's raw rows of epoch ``epoch`` as a ``datasets.IterableDataset``: the shards in the epoch's
        order, split by ``split_dataset_by_node``."""
        from datasets import IterableDataset
        from datasets.distributed import split_dataset_by_node

        offsets = self.shards.offsets
        shards = [(s, self.shards.files[s], None if offsets is None else offsets[s]) for s in self.shard_order(epoch)]
        ds = IterableDataset.from_generator(
            shard_examples, features=self._encoded_features,
            gen_kwargs={"shards": shards, "builder": self.shards.builder, "features": self.shards.features,
                        "max_samples": self.max_samples, "exclude": self.exclude},
        )
        return split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size) if self.world_size > 1 else ds

    def block_order(self, epoch: int, block: int, size: int) -> list[int]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            return list(range(size))
        rng = np.random.default_rng([self.seed, epoch, self.rank, self.world_size, block])
        return [int(i) for i in rng.permutation(size)]

    def raw_rows(self, state: dict | None = None) -> Iterator[tuple[dict, dict]]:
        """(raw row, state after it) from ``state`` (None: the start of epoch 0), endlessly."""
        state = dict(state or {"epoch": 0, "block": 0, "source": None, "taken": 0})
        epoch = state["epoch"]
        while True:
            source = self.epoch_source(epoch)
            start = state["source"] if state["epoch"] == epoch else None
            if start is not None:
                source.load_state_dict(start)
            block, skip = (state["block"], state["taken"]) if state["epoch"] == epoch else (0, 0)
            rows = iter(source)
            seen = skip > 0 or block > 0
            try:
                while True:
                    taken = list(islice(rows, self.shuffle_buffer))
                    if not taken:
                        break
                    seen = True
                    after = source.state_dict()
                    order = self.block_order(epoch, block, len(taken))
                    for k in range(skip, len(taken)):
                        yield taken[order[k]], {"epoch": epoch, "block": block, "source": start, "taken": k + 1}
                    start, block, skip = after, block + 1, 0
            finally:
                close = getattr(rows, "close", None)
                if close is not None:
                    close()
            if not seen:
                raise ValueError(f"Process {self.rank} of {self.world_size} got no rows of the stream "
                                 f"{self.shards.name} in epoch {epoch} ({len(self.shards.files)} shards).")
            epoch += 1

    def example(self, raw: dict, epoch: int) -> dict:
        """The training example of a raw row: its input columns decoded, transformed with a ``random.Random``
        seeded by (seed, epoch, index), plus ``index``."""
        index = raw[INDEX_KEY]
        batch = {}
        for column in self.input_columns:
            feature, value = self.shards.features[column], raw[column]
            batch[column] = [feature.decode_example(value) if value is not None and decodable(feature) else value]
        # (seed, epoch, index, 7): a stream of its own, apart from the noise draws seeded by (seed, epoch, index)
        rng = random.Random(int(np.random.SeedSequence([self.seed, epoch, index, 7]).generate_state(1)[0]))
        out = {name: values[0] for name, values in self.transform(batch, rngs=[rng]).items()}
        out["index"] = index
        return out

    def examples(self, state: dict | None = None) -> Iterator[tuple[dict, dict]]:
        """(example, state after it), endlessly, transformed in this thread."""
        rows = self.raw_rows(state)
        try:
            for raw, position in rows:
                yield self.example(raw, position["epoch"]), position
        finally:
            rows.close()


# -- batches -------------------------------------------------------------------------------------------------
class StreamingLoader:
    """Batches of ``batch_size`` examples of an :class:`ImageStream`, collated by ``collate_fn``, endlessly; a
    checkpointable position (``state_dict`` / ``load_state_dict``: the next batch after the last one taken).

    ``num_workers``: threads that decode and transform rows (0: all in the calling thread, no threads at all);
    ``prefetch_batches``: batches made ahead by a background thread (with workers); ``pin_memory``: pin batches
    for asynchronous copies to a GPU. :attr:`epoch` is the epoch of the batch last taken."""

    def __init__(self, stream: ImageStream, batch_size: int, collate_fn: Callable = collate_examples,
                 num_workers: int = 0, prefetch_batches: int = 2, pin_memory: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}.")
        self.stream, self.batch_size, self.collate_fn = stream, batch_size, collate_fn
        self.num_workers, self.prefetch_batches = max(0, num_workers), max(1, prefetch_batches)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._state: dict | None = None
        self.epoch = 0
        self.batches_taken = 0

    # state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"config": {**self.stream.config(), "batch_size": self.batch_size}, "position": self._state,
                "epoch": self.epoch, "batches": self.batches_taken}

    def load_state_dict(self, state: dict) -> None:
        config = {**self.stream.config(), "batch_size": self.batch_size}
        if state["config"] != config:
            changed = sorted(k for k in config if state["config"].get(k) != config[k])
            raise ValueError(f"The saved stream position belongs to another stream setup (differs in {changed}); "
                             "resume with the same data, seed, process count, batch size and shuffle buffer.")
        self._state, self.epoch, self.batches_taken = state["position"], state["epoch"], state["batches"]

    # batches ----------------------------------------------------------------------------------------------
    def _examples(self, state) -> Iterator[tuple[dict, dict]]:
        if not self.num_workers:
            yield from self.stream.examples(state)
            return
        pending: deque = deque()
        lookahead = self.num_workers * 2 + self.batch_size
        rows = self.stream.raw_rows(state)
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="stream-transform") as pool:
            try:
                while True:
                    try:
                        raw, position = next(rows)
                    except StopIteration:
                        break
                    except BaseException:
                        while pending:  # the rows read before the error come out first, as without threads
                            future, done = pending.popleft()
                            yield future.result(), done
                        raise
                    pending.append((pool.submit(self.stream.example, raw, position["epoch"]), position))
                    if len(pending) >= lookahead:
                        future, done = pending.popleft()
                        yield future.result(), done
                while pending:
                    future, done = pending.popleft()
                    yield future.result(), done
            finally:
                for future, _ in pending:
                    future.cancel()
                rows.close()

    def _batches(self, state) -> Iterator[tuple[dict, dict]]:
        rows, epoch, made = [], None, 0
        resumed = state["epoch"] if state else None  # its first rows were taken before: it may hold no more batch
        examples = self._examples(state)
        try:
            for example, position in examples:
                if position["epoch"] != epoch:
                    if epoch is not None and made == 0 and epoch != resumed:
                        raise ValueError(f"Process {self.stream.rank}'s part of epoch {epoch} of the stream holds "
                                         f"fewer than batch_size={self.batch_size} rows: lower the batch size or "
                                         "add data.")
                    rows, epoch, made = [], position["epoch"], 0  # rows that did not fill a batch are dropped
                rows.append(example)
                if len(rows) == self.batch_size:
                    batch = self.collate_fn(rows)
                    if self.pin_memory:
                        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    yield batch, position
                    rows, made = [], made + 1
        finally:
            examples.close()

    def __iter__(self) -> Iterator[dict]:
        """Batches from the current position on (a new ``iter`` continues after the last batch taken)."""
        source = self._batches(self._state) if not self.num_workers else _Prefetcher(
            self._batches(self._state), self.prefetch_batches)
        try:
            for batch, position in source:
                self._state, self.epoch = position, position["epoch"]
                self.batches_taken += 1
                yield batch
        finally:
            source.close()


class _Prefetcher:
    """Runs a generator in a background thread, ``size`` items ahead; ``close`` stops it."""

    _END = object()

    def __init__(self, generator, size: int):
        self.generator, self.queue = generator, queue.Queue(size)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="stream-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            for item in self.generator:
                if not self._put(item):
                    break
            else:
                self._put(self._END)
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)
        finally:
            self.generator.close()

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self.stop.set()
        self.thread.join()


# -- checkpointing -------------------------------------------------------------------------------------------
class StreamCheckpoint:
    """The loader's position for ``accelerator.register_for_checkpointing``.

    accelerate calls ``state_dict()`` on every process but writes only the main process's result, and every
    process loads that one file; so ``state_dict`` gathers all processes' positions (``gather``: a function
    from a one-item list to the list over processes, default ``accelerate.utils.gather_object``) and
    ``load_state_dict`` picks this process's. A checkpoint resumes only with the process count it was saved with."""

    def __init__(self, loader: StreamingLoader, rank: int = 0, world_size: int = 1, gather: Callable | None = None):
        self.loader, self.rank, self.world_size = loader, rank, world_size
        self.gather = gather_object if gather is None and world_size > 1 else gather

    def state_dict(self) -> dict:
        mine = self.loader.state_dict()
        states = list(self.gather([mine])) if self.world_size > 1 else [mine]
        return {"world_size": self.world_size, "ranks": states}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size:
            raise ValueError(f"The checkpoint's stream positions are for {state['world_size']} process(es), this run "
                             f"has {self.world_size}: a stream resumes exactly only with the same process count.")
        self.loader.load_state_dict(state["ranks"][self.rank])


# -- the training script's stream -----------------------------------------------------------------------------
def streaming_loader(
    source,
    *,
    resolution: int,
    batch_size: int,
    image_column: str | None = None,
    columns: dict[str, str] | None = None,
    center_crop: bool = True,
    random_flip: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 1000,
    shuffle: bool = True,
    num_workers: int = 0,
    prefetch_batches: int = 2,
    pin_memory: bool = False,
    max_samples: int | None = None,
    exclude=(),
    split: str = "train",
    config_name: str | None = None,
    data_files=None,
    cache_dir: str | None = None,
) -> StreamingLoader:
    """The training batches of a streaming source, with the rows the map-style path makes (``example_transform``
    with these arguments: ``pixel_values``, the conditioning inputs named by ``columns`` {column: input}, and
    ``index``). ``source``: see :func:`resolve_stream` (or a :class:`StreamShards`)."""
    shards = source if isinstance(source, StreamShards) else resolve_stream(source, split, config_name, data_files,
                                                                            cache_dir)
    image_column = image_column_of(shards, image_column)
    transform = example_transform(image_column, resolution, center_crop, random_flip, columns)
    stream = ImageStream(shards, transform, [image_column, *(columns or {})], seed=seed, rank=rank,
                         world_size=world_size, shuffle_buffer=shuffle_buffer, shuffle=shuffle,
                         max_samples=max_samples, exclude=exclude)
    return StreamingLoader(stream, batch_size, collate_examples, num_workers, prefetch_batches, pin_memory)


def take_rows(shards: StreamShards, n: int, cache_dir: str | None = None):
    """The first ``n`` rows of the unshuffled stream (of the shards in order) as a map-style ``datasets.Dataset``
    with the stream's features, and their indices: validation rows (read only as far as needed). Hold them out
    of training with ``exclude=indices`` when they come from the training split."""
    from datasets import Dataset

    rows, indices = [], []
    for row in shard_examples([(s, f, None if shards.offsets is None else shards.offsets[s])
                            for s, f in enumerate(shards.files)], shards.builder, shards.features, None, frozenset()):
        indices.append(row.pop(INDEX_KEY))
        rows.append(row)
        if len(rows) == n:
            break
    if not rows:
        raise ValueError(f"The stream {shards.name} has no rows.")
    return Dataset.from_list(rows, features=shards.features), indices
