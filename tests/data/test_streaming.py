"""Training data streamed from local parquet / webdataset shards (ldm_diffusers.data.streaming): the same rows
as the map-style path, an exact resume, a split across processes, and no reading ahead of need."""

import io
import tarfile
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.scripts import reset_accelerate_state
from PIL import Image

from ldm_diffusers.data.stream_source import INDEX_STRIDE, resolve_stream
from ldm_diffusers.data.streaming import StreamCheckpoint, streaming_loader, take_rows
from ldm_diffusers.data.transforms import example_transform

SHARDS, ROWS = 3, 7  # 21 rows
COLUMNS = {"text": "prompt", "label": "class_labels"}


def _images():
    rng = np.random.default_rng(0)
    # sizes differ (and are not square) so that resizing and cropping have work to do
    return [Image.fromarray(rng.integers(0, 256, (18 + i % 3, 20 + i % 5, 3), dtype=np.uint8))
            for i in range(SHARDS * ROWS)]


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    folder = tmp_path_factory.mktemp("parquet")
    images = _images()
    features = Features({"image": ImageFeature(), "text": Value("string"), "label": ClassLabel(num_classes=3)})
    for s in range(SHARDS):
        rows = range(s * ROWS, (s + 1) * ROWS)
        table = {"image": [images[i] for i in rows], "text": [f"an image, row {i}" for i in rows],
                 "label": [i % 3 for i in rows]}
        Dataset.from_dict(table, features=features).to_parquet(folder / f"part-{s:05d}.parquet")
    return folder


@pytest.fixture(scope="module")
def reference(parquet_dir):
    """The map-style path over the same rows: the parquet files as one ``datasets.Dataset`` with the training
    transform (as ``set_up_columns`` sets it), row i with index i (as ``IndexedDataset``)."""
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=sorted(str(p) for p in parquet_dir.glob("*.parquet")), split="train")
    ds.set_transform(example_transform("image", 16, True, False, COLUMNS))
    return [{**ds[i], "index": i} for i in range(len(ds))]


def loader_for(source, **kwargs):
    kwargs = {"resolution": 16, "batch_size": 4, "columns": COLUMNS, "seed": 5, "shuffle_buffer": 5, **kwargs}
    return streaming_loader(source, **kwargs)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert x["index"].tolist() == y["index"].tolist()
        assert x["prompt"] == y["prompt"]
        assert torch.equal(x["pixel_values"], y["pixel_values"])
        assert torch.equal(x["class_labels"], y["class_labels"])


def test_stream_rows_are_the_map_style_rows(parquet_dir, reference):
    shards = resolve_stream(parquet_dir)
    assert shards.builder == "parquet" and shards.lengths == [ROWS] * SHARDS and shards.offsets == [0, 7, 14]
    # in order (no shuffle): batch after batch, the map-style rows 0, 1, 2, ...
    loader = loader_for(shards, batch_size=3, shuffle=False)
    batches = take(iter(loader), SHARDS * ROWS // 3)
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(SHARDS * ROWS))
    assert loader.epoch == 0
    for batch in batches:
        assert set(batch) == {"pixel_values", "prompt", "class_labels", "index"}
        assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["class_labels"].dtype == torch.long
        for k, i in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["pixel_values"][k], reference[i]["pixel_values"])
            assert batch["prompt"][k] == reference[i]["prompt"]
            assert batch["class_labels"][k] == reference[i]["class_labels"]
    # shuffled, transformed in 2 threads: every row of the epoch once, each equal to the map-style row of its index
    loader = loader_for(shards, batch_size=3, num_workers=2)
    batches = take(iter(loader), SHARDS * ROWS // 3)
    order = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(order) == list(range(SHARDS * ROWS)) and order != sorted(order)
    for batch in batches:
        for k, i in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["pixel_values"][k], reference[i]["pixel_values"])


@pytest.mark.parametrize("num_workers, rank, world_size", [(0, 0, 1), (2, 0, 1), (0, 1, 2), (2, 0, 2)])
def test_resume_continues_with_exactly_the_next_batch(parquet_dir, num_workers, rank, world_size):
    """Stop after k batches, save the position (through torch.save, as accelerate stores it), rebuild, load it:
    the batches that follow are those of an uninterrupted run, across block, shard and epoch boundaries."""
    kwargs = {"num_workers": num_workers, "rank": rank, "world_size": world_size,
              "batch_size": 2 if world_size > 1 else 4}
    shards = resolve_stream(parquet_dir)
    total = 14
    uninterrupted = take(iter(loader_for(shards, **kwargs)), total)
    epochs_seen = set()
    for k in (1, 3, 5, 6, 11):
        first = loader_for(shards, **kwargs)
        it = iter(first)
        assert_same_batches(take(it, k), uninterrupted[:k])
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        epochs_seen.add(first.epoch)
        it.close()
        assert not [t for t in threading.enumerate() if t.name.startswith("stream-")]  # its threads are gone
        buffer.seek(0)
        resumed = loader_for(shards, **kwargs)
        resumed.load_state_dict(torch.load(buffer, weights_only=False))
        assert_same_batches(take(iter(resumed), total - k), uninterrupted[k:])
    assert len(epochs_seen) > 1  # resumed in the first epoch and in later ones
    # a new ``iter`` continues after the last batch taken, like a resume
    loader = loader_for(shards, **kwargs)
    got = take(iter(loader), 2) + take(iter(loader), 3)
    assert_same_batches(got, uninterrupted[:5])


def test_accelerate_checkpoints_the_stream_position(parquet_dir, tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    shards = resolve_stream(parquet_dir)
    accelerator = Accelerator(cpu=True)
    loader = loader_for(shards)
    accelerator.register_for_checkpointing(StreamCheckpoint(loader))
    it = iter(loader)
    take(it, 4)
    accelerator.save_state(str(tmp_path / "checkpoint"))
    expected = take(it, 5)
    it.close()

    reset_accelerate_state()
    accelerator = Accelerator(cpu=True)
    resumed = loader_for(shards)
    accelerator.register_for_checkpointing(StreamCheckpoint(resumed))
    accelerator.load_state(str(tmp_path / "checkpoint"))
    assert_same_batches(take(iter(resumed), 5), expected)


def test_checkpoint_gathers_every_process_position_and_refuses_another_process_count(parquet_dir):
    shards = resolve_stream(parquet_dir)
    loaders = [loader_for(shards, rank=r, world_size=2, batch_size=2) for r in range(2)]
    for r, loader in enumerate(loaders):
        take(iter(loader), 2 + r)
    states = [loader.state_dict() for loader in loaders]
    # accelerate's gather_object over two processes, as each process sees it
    saved = StreamCheckpoint(loaders[0], 0, 2, gather=lambda mine: states).state_dict()
    assert saved["world_size"] == 2 and saved["ranks"] == states
    resumed = [loader_for(shards, rank=r, world_size=2, batch_size=2) for r in range(2)]
    for r in range(2):
        StreamCheckpoint(resumed[r], r, 2, gather=lambda mine: states).load_state_dict(saved)
        assert_same_batches(take(iter(resumed[r]), 2), take(iter(loaders[r]), 2))
    with pytest.raises(ValueError, match="same process count"):
        StreamCheckpoint(loader_for(shards), 0, 1).load_state_dict(saved)
    with pytest.raises(ValueError, match="batch_size"):
        loader_for(shards, batch_size=3).load_state_dict(loaders[0].state_dict())


@pytest.mark.parametrize("num_shards", [2, 3])  # 2: whole shards per process; 3: every other row of each shard
def test_two_processes_see_disjoint_rows_that_make_up_the_set(parquet_dir, num_shards):
    files = sorted(str(p) for p in parquet_dir.glob("*.parquet"))[:num_shards]
    shards = resolve_stream(files)
    everything = set(range(num_shards * ROWS))
    kwargs = {"random_flip": True, "center_crop": False, "batch_size": 1}  # per-example random crops and flips
    single = {}
    for batch in take(iter(loader_for(shards, **kwargs)), len(everything)):
        single[batch["index"].item()] = batch["pixel_values"][0]
    assert set(single) == everything
    seen = []
    for rank in range(2):
        loader = loader_for(shards, rank=rank, world_size=2, **kwargs)
        rows = []
        for batch in loader:
            if loader.epoch > 0:
                break
            index = batch["index"].item()
            rows.append(index)
            # the same example as in the one-process run (crop and flip are seeded by (seed, epoch, index))
            assert torch.equal(batch["pixel_values"][0], single[index])
        seen.append(rows)
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == everything
    assert len(seen[0]) + len(seen[1]) == len(everything)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_stream_is_never_materialised(parquet_dir, tmp_path, num_workers):
    """The first batch needs the first shard only: with every other shard gone after the stream was opened, it
    still arrives; the stream fails only when it reaches a missing shard."""
    import shutil

    folder = tmp_path / "shards"
    shutil.copytree(parquet_dir, folder)
    shards = resolve_stream(folder)
    loader = loader_for(shards, batch_size=2, shuffle_buffer=3, num_workers=num_workers)
    first_shard = shards.files[loader.stream.shard_order(0)[0]]
    for file in shards.files:
        if file != first_shard:
            (folder / file.rsplit("/", 1)[-1]).unlink()
    it = iter(loader)
    batch = next(it)
    offset = shards.offsets[shards.files.index(first_shard)]
    assert all(offset <= i < offset + ROWS for i in batch["index"].tolist())
    with pytest.raises(FileNotFoundError):
        take(it, ROWS)  # the next shard's rows are read only now, and it is gone
    assert not [t for t in threading.enumerate() if t.name.startswith("stream-")]


def _write_tar(path, rows):
    with tarfile.open(path, "w") as tar:
        for key, image, text in rows:
            for name, data in ((f"{key}.png", _png(image)), (f"{key}.txt", text.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png(image):
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_webdataset_shards_stream_the_same_images(tmp_path, reference):
    images = _images()
    for s in range(SHARDS):
        _write_tar(tmp_path / f"shard-{s:05d}.tar",
                   [(f"{i:06d}", images[i], f"an image, row {i}") for i in range(s * ROWS, (s + 1) * ROWS)])
    shards = resolve_stream(tmp_path)
    assert shards.builder == "webdataset" and shards.lengths is None
    loader = loader_for(shards, columns={"txt": "prompt"}, batch_size=3, shuffle=False)
    batches = take(iter(loader), SHARDS * ROWS // 3)
    indices = torch.cat([b["index"] for b in batches]).tolist()
    assert indices == [s * INDEX_STRIDE + r for s in range(SHARDS) for r in range(ROWS)]  # rows not counted
    for batch in batches:
        for k, index in enumerate(batch["index"].tolist()):
            i = (index // INDEX_STRIDE) * ROWS + index % INDEX_STRIDE
            assert torch.equal(batch["pixel_values"][k], reference[i]["pixel_values"])
            assert batch["prompt"][k] == reference[i]["prompt"]
    with pytest.raises(ValueError, match="row counts"):
        loader_for(shards, columns={"txt": "prompt"}, max_samples=5)


def test_validation_rows_are_taken_from_the_stream_and_held_out(parquet_dir, reference):
    shards = resolve_stream(parquet_dir)
    val, held_out = take_rows(shards, 4)
    assert held_out == [0, 1, 2, 3] and len(val) == 4 and val.features == shards.features
    val.set_transform(example_transform("image", 16, True, False, COLUMNS))
    assert torch.equal(val[2]["pixel_values"], reference[2]["pixel_values"])
    loader = loader_for(shards, exclude=held_out, batch_size=1)
    indices = []
    for batch in loader:
        if loader.epoch > 0:
            break
        indices.append(batch["index"].item())
    assert sorted(indices) == list(range(4, SHARDS * ROWS))
    loader = loader_for(shards, max_samples=9, batch_size=1, shuffle=False)
    assert [b["index"].item() for b in take(iter(loader), 10)] == list(range(9)) + [0]


def test_clear_errors(parquet_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No .parquet or .tar shards"):
        resolve_stream(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_stream(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="No shards match"):
        resolve_stream(str(tmp_path / "*.parquet"))
    with pytest.raises(FileNotFoundError, match="No shards of the 'validation' split"):
        resolve_stream(parquet_dir, split="validation")
    (tmp_path / "mixed").mkdir()
    for name in ("a.parquet", "b.tar"):
        (tmp_path / "mixed" / name).write_bytes((parquet_dir / "part-00000.parquet").read_bytes())
    with pytest.raises(ValueError, match="one format"):
        resolve_stream(tmp_path / "mixed")
    shards = resolve_stream(parquet_dir)
    with pytest.raises(ValueError, match=r"no column\(s\) \['caption'\]"):
        loader_for(shards, columns={"caption": "prompt"})
    with pytest.raises(ValueError, match="image_column 'img'"):
        loader_for(shards, image_column="img")
    with pytest.raises(ValueError, match="fewer than batch_size"):
        next(iter(loader_for(shards, batch_size=SHARDS * ROWS + 1)))


def test_a_hub_dataset_streams_the_data_files_its_builder_resolves(parquet_dir, monkeypatch, reference):
    """A Hub id goes through ``datasets.load_dataset_builder`` (its data files per split, hf:// URLs on the Hub);
    here the builder answers with the local shards."""
    import datasets

    files = sorted(str(p) for p in parquet_dir.glob("*.parquet"))
    calls = []

    def fake_builder(name, config_name=None, data_files=None, cache_dir=None):
        calls.append((name, config_name))
        return SimpleNamespace(config=SimpleNamespace(data_files={"train": files, "test": files[:1]}))

    monkeypatch.setattr(datasets, "load_dataset_builder", fake_builder)
    shards = resolve_stream("someone/emoji-shards", config_name="default")
    assert calls == [("someone/emoji-shards", "default")]
    assert shards.files == files and shards.lengths == [ROWS] * SHARDS
    batch = next(iter(loader_for(shards, shuffle=False)))
    assert torch.equal(batch["pixel_values"][3], reference[3]["pixel_values"])
    with pytest.raises(ValueError, match=r"no 'validation' split to stream \(it has \['test', 'train'\]\)"):
        resolve_stream("someone/emoji-shards", split="validation")
