"""The latent cache as memory-mapped .npy shards (ldm_diffusers.training.latent_cache): built by several processes
in parallel (simulated with threads and a barrier) it equals the one-process build; damaged or unfinished
shards are found and rebuilt; rows are read from np.memmap arrays."""

import json
import pickle
import threading

import numpy as np
import pytest
import torch
from helpers.models import tiny_kl

from ldm_diffusers.conditioning import TrainingColumns
from ldm_diffusers.conditioning.spatial import SuperResolutionMode
from ldm_diffusers.data.transforms import collate_examples
from ldm_diffusers.models.autoencoders import encode_latent_moments
from ldm_diffusers.training import latent_cache
from ldm_diffusers.training.latent_cache import (
    INFO_FILE,
    LatentCacheDataset,
    build_latent_cache,
    cache_problem,
    load_latent_cache,
)

ROWS = 11
SETTINGS = {"test": "sharded cache"}


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return tiny_kl(4).eval()


@pytest.fixture(scope="module")
def rows():
    """Rows as the training loop's dataset gives them: pixels, index and every kind of conditioning column."""
    g = torch.Generator().manual_seed(1)
    return [{"pixel_values": torch.rand(3, 16, 16, generator=g) * 2 - 1, "index": i, "prompt": f"emoji {i}",
             "class_labels": i % 3, "layout": [[1, 0.125, 0.25, 0.5, 0.75]] * (i % 3),
             "segmentation_map": torch.randint(0, 9, (16, 16), generator=g)} for i in range(ROWS)]


MODE, COLUMNS = SuperResolutionMode(), TrainingColumns(downsampling_factor=4)


def build(rows, vae, cache_dir, **kwargs):
    kwargs = {"batch_size": 2, "show_progress": False, "shard_rows": 3, **kwargs}
    return build_latent_cache(rows, vae, MODE, COLUMNS, cache_dir, SETTINGS, **kwargs)


def build_in_parallel(rows, vae, cache_dir, world_size, **kwargs):
    """``world_size`` ranks, one thread each, meeting at a barrier as processes meet at accelerate's."""
    barrier, results, errors = threading.Barrier(world_size, timeout=120), {}, []

    def rank(r):
        try:
            results[r] = build(rows, vae, cache_dir, rank=r, world_size=world_size, barrier=barrier.wait, **kwargs)
        except BaseException as err:
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [results[r] for r in range(world_size)]


def assert_same_rows(a, b):
    assert len(a) == len(b) and a.column_names == b.column_names
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]) if isinstance(x[key], torch.Tensor) else x[key] == y[key], (i, key)


def test_rows_hold_what_the_training_loop_reads(rows, vae, tmp_path):
    cache = build(rows, vae, tmp_path)
    assert len(cache) == ROWS and sorted(p.name for p in cache.path.iterdir()) == [
        INFO_FILE, "shard-00000", "shard-00001", "shard-00002", "shard-00003"]
    expected = encode_latent_moments(vae, torch.stack([r["pixel_values"] for r in rows]))
    low_res = MODE.cache_inputs({"pixel_values": torch.stack([r["pixel_values"] for r in rows])}, COLUMNS)["low_res"]
    for i, row in enumerate(rows):
        got = cache[i]
        assert set(got) == {"latent_mean", "latent_std", "low_res", "index", "prompt", "class_labels", "layout",
                            "segmentation_map"}
        torch.testing.assert_close(got["latent_mean"], expected["latent_mean"][i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["latent_std"], expected["latent_std"][i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["low_res"], low_res[i], rtol=1e-5, atol=1e-6)
        assert got["latent_mean"].dtype == torch.float32
        assert got["index"] == i and got["class_labels"] == i % 3 and got["prompt"] == f"emoji {i}"
        assert got["layout"] == row["layout"]
        assert got["segmentation_map"].dtype == torch.int64
        assert torch.equal(got["segmentation_map"], row["segmentation_map"])
    # the loop's collate batches cache rows as it batches pixel rows; a DataLoader fetches a batch at once
    batch = collate_examples(cache.__getitems__([4, 0, 9]))
    assert batch["index"].tolist() == [4, 0, 9] and batch["latent_mean"].shape == (3, 3, 4, 4)
    assert batch["class_labels"].dtype == torch.long and batch["prompt"] == ["emoji 4", "emoji 0", "emoji 9"]
    loader = torch.utils.data.DataLoader(cache, batch_size=4, shuffle=False, collate_fn=collate_examples)
    assert torch.equal(torch.cat([b["latent_mean"] for b in loader]), cache[:]["latent_mean"])
    assert cache[:]["index"] == list(range(ROWS))


def test_rows_are_read_from_memory_mapped_arrays(rows, vae, tmp_path):
    cache = build(rows, vae, tmp_path)
    arrays = cache.arrays
    assert set(arrays) == {"latent_mean", "latent_std", "low_res", "index", "class_labels", "segmentation_map"}
    assert all(isinstance(a, np.memmap) and a.mode == "r" for shard in arrays.values() for a in shard)
    assert arrays["segmentation_map"][0].dtype == np.uint8  # class ids stored small, read back as int64
    row = cache[1]
    row["latent_mean"] += 1  # a row is a copy: the maps are read-only and stay untouched
    assert not torch.equal(cache[1]["latent_mean"], row["latent_mean"])
    # DataLoader workers get the dataset pickled: the maps are not copied into the pickle, each worker opens its own
    assert len(pickle.dumps(cache)) < 4000
    loader = torch.utils.data.DataLoader(cache, batch_size=3, num_workers=2, collate_fn=collate_examples)
    assert torch.cat([b["index"] for b in loader]).tolist() == list(range(ROWS))


@pytest.mark.parametrize("world_size", [2, 3])
def test_processes_building_in_parallel_write_the_one_process_cache(rows, vae, tmp_path, world_size):
    one = build(rows, vae, tmp_path / "one")
    parts = build_in_parallel(rows, vae, tmp_path / "many", world_size)
    for cache in parts:  # every process gets the whole cache
        assert_same_rows(one, cache)
    # the same folder, byte for byte: the shards do not depend on who wrote them
    files = sorted(p.relative_to(one.path) for p in one.path.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(parts[0].path) for p in parts[0].path.rglob("*") if p.is_file())
    for name in files:
        assert (one.path / name).read_bytes() == (parts[0].path / name).read_bytes(), name
    assert not list((tmp_path / "many").glob(".*"))  # no build folder left


def test_each_process_encodes_only_its_shards(rows, vae, tmp_path, monkeypatch):
    encoded, lock = {}, threading.Lock()
    real = latent_cache._write_shard

    def spy(staging, name, build_info, arrays, lists):
        with lock:
            encoded[name] = threading.current_thread().name
        return real(staging, name, build_info, arrays, lists)

    monkeypatch.setattr(latent_cache, "_write_shard", spy)
    build_in_parallel(rows, vae, tmp_path, 2)
    assert sorted(encoded) == ["shard-00000", "shard-00001", "shard-00002", "shard-00003"]
    assert encoded["shard-00000"] == encoded["shard-00002"] != encoded["shard-00001"] == encoded["shard-00003"]


def test_a_truncated_or_missing_shard_file_is_found_and_rebuilt(rows, vae, tmp_path, caplog):
    first = build(rows, vae, tmp_path)
    folder = first.path
    assert cache_problem(folder) is None
    file = folder / "shard-00001" / "latent_std.npy"
    whole = file.read_bytes()
    file.write_bytes(whole[: len(whole) // 2])
    assert "shard-00001/latent_std.npy has" in cache_problem(folder) and "bytes" in cache_problem(folder)
    with pytest.raises(ValueError, match="unusable"):
        load_latent_cache(folder)
    with caplog.at_level("WARNING"):
        rebuilt = build(rows, vae, tmp_path)
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    assert cache_problem(folder) is None and file.read_bytes() == whole
    assert_same_rows(first, rebuilt)
    # a whole shard gone, an array of another length, a manifest never written
    import shutil

    shutil.rmtree(folder / "shard-00002")
    assert cache_problem(folder) == "shard-00002 is missing"
    build(rows, vae, tmp_path)
    info = json.loads((folder / INFO_FILE).read_text())
    np.save(folder / "shard-00000" / "index.npy", np.arange(2))
    info["shards"][0]["files"]["index.npy"] = (folder / "shard-00000" / "index.npy").stat().st_size
    (folder / INFO_FILE).write_text(json.dumps(info))
    assert cache_problem(folder) == "shard-00000/index.npy has 2 rows, 3 were written"
    (folder / INFO_FILE).unlink()
    assert "no complete" in cache_problem(folder)
    assert_same_rows(first, build(rows, vae, tmp_path))
    assert not list(tmp_path.glob(".*"))


def test_an_interrupted_build_keeps_its_finished_shards(rows, vae, tmp_path, monkeypatch):
    reference = build(rows, vae, tmp_path / "reference")
    real, written = latent_cache._write_shard, []

    def dies_after_two(staging, name, *args):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(name)
        return real(staging, name, *args)

    monkeypatch.setattr(latent_cache, "_write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build(rows, vae, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]  # nothing published
    written.clear()
    monkeypatch.setattr(latent_cache, "_write_shard", lambda staging, name, *args: (written.append(name),
                                                                                     real(staging, name, *args)))
    resumed = build(rows, vae, tmp_path / "cache")
    assert written == ["shard-00002", "shard-00003"]  # the two finished shards were kept
    assert_same_rows(reference, resumed)
    assert not list((tmp_path / "cache").glob(".*"))


def test_an_old_arrow_cache_is_rebuilt(rows, vae, tmp_path, caplog):
    from ldm_diffusers.training.latent_cache import cache_key

    old = tmp_path / cache_key(SETTINGS)
    old.mkdir()
    (old / INFO_FILE).write_text(json.dumps({"settings": SETTINGS, "rows": ROWS, "files": {}}))  # format 1
    assert "format 1" in cache_problem(old)
    with caplog.at_level("WARNING"):
        cache = build(rows, vae, tmp_path)
    assert "format 1" in caplog.text and isinstance(cache, LatentCacheDataset) and len(cache) == ROWS


def test_bad_arguments(rows, vae, tmp_path):
    with pytest.raises(ValueError, match="barrier"):
        build(rows, vae, tmp_path, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank 2"):
        build(rows, vae, tmp_path, rank=2, world_size=2, barrier=lambda: None)
    with pytest.raises(ValueError, match="no rows"):
        build([], vae, tmp_path)


def test_float16_latents_halve_the_cache(rows, vae, tmp_path):
    full = build(rows, vae, tmp_path)
    half = build(rows, vae, tmp_path, latent_dtype="float16")
    assert half.path != full.path  # another key
    assert half[0]["latent_mean"].dtype == torch.float16
    torch.testing.assert_close(half[:]["latent_mean"].float(), full[:]["latent_mean"], rtol=1e-3, atol=1e-3)
