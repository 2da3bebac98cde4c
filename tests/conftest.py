import os
from pathlib import Path

import pytest
import torch
from helpers.local_hub import point_huggingface_hub_at
from helpers.models import tiny_kl
from helpers.paths import COMPVIS_FIXTURES
from helpers.scripts import reset_accelerate_state

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (pyproject's addopts: one worker per core) each worker computes on its share of the cores, so
# that two workers do not oversubscribe them; every tolerance in the suite holds for any thread count.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def pytest_collection_modifyitems(config, items):
    """``slow`` tests (whole scripts in subprocesses, tens of seconds each) first: the workers then share the rest
    and finish together instead of one worker starting a long test when the other is done."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; in-process training runs each need fresh ones."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


@pytest.fixture(scope="session")
def stage1(tmp_path_factory):
    """A saved tiny KL-f4 autoencoder (random weights, seed 0) for stage-2 training tests."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("stage1") / "kl-f4"
    tiny_kl(4).save_pretrained(path)
    return path


def shared_path(tmp_path_factory, name: str, build) -> Path:
    """``<run's temporary folder>/name``, made by ``build(path)`` once per test run: under pytest-xdist the first
    worker to need it builds it (the others wait on a file lock) and every worker reads it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def emoji16(tmp_path_factory):
    """The real built-in dataset at 16x16 (renders in a few seconds; once per test run)."""
    from ldm_diffusers.data import build_emoji_dataset

    return shared_path(tmp_path_factory, "emoji16", lambda path: build_emoji_dataset(path, resolution=16))


@pytest.fixture(scope="session")
def emoji16_tiny(emoji16, tmp_path_factory):
    """8 training and 8 validation images of ``emoji16`` as a save_to_disk folder: it loads in milliseconds,
    where the whole imagefolder spends a second or more listing its 3,655 files in every process that opens it."""
    from datasets import DatasetDict

    from ldm_diffusers.data import load_image_splits

    train, val = load_image_splits(train_data_dir=str(emoji16), resolution=16)
    path = tmp_path_factory.mktemp("data") / "emoji16-tiny"
    DatasetDict(train=train.select(range(8)), validation=val.select(range(8))).save_to_disk(str(path))
    return path


@pytest.fixture(scope="session")
def local_hub_server(tmp_path_factory):
    """olah on a free loopback port (tests/helpers/local_hub.py), for the whole session."""
    from helpers.local_hub import LocalHub

    hub = LocalHub(tmp_path_factory.mktemp("hub")).start()
    yield hub
    hub.stop()


@pytest.fixture(scope="session")
def hub_write_server(local_hub_server):
    """The test write API (tests/helpers/hub_write_server.py) in front of olah, for the whole session."""
    from helpers.hub_write_server import HubWriteServer

    server = HubWriteServer(local_hub_server).start()
    yield server
    server.stop()


@pytest.fixture
def local_hub(local_hub_server, tmp_path, monkeypatch):
    """olah itself as the Hub: read-only, repositories made with ``local_hub.publish``."""
    point_huggingface_hub_at(local_hub_server.endpoint, tmp_path, monkeypatch)
    return local_hub_server


@pytest.fixture
def writable_hub(hub_write_server, tmp_path, monkeypatch):
    """The write server (in front of olah) as the Hub, with a user token set: pushes go through it."""
    point_huggingface_hub_at(hub_write_server.endpoint, tmp_path, monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub_write_server.requests.clear()  # the server lives for the session; each test reads only its own requests
    return hub_write_server


COMPVIS_FIXTURES = COMPVIS_FIXTURES


@pytest.fixture(scope="session")
def compvis_checkpoints(tmp_path_factory):
    """model.ckpt of every CompVis fixture (tests/fixtures/compvis), written by the fixtures' own materialize.py in
    two subprocesses (one per core; it registers a stand-in Lightning module to pickle the callback, which this
    process must not see); once per test run. Returns the folder holding <name>.ckpt."""
    import subprocess
    import sys

    def build(out: Path) -> None:
        out.mkdir()
        names = sorted(p.name for p in COMPVIS_FIXTURES.iterdir() if (p / "meta.json").is_file())
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import materialize\n"
                "for name in sys.argv[3:]: materialize.materialize(f'{sys.argv[1]}/{name}', f'{sys.argv[2]}/{name}.ckpt')")
        workers = [subprocess.Popen([sys.executable, "-c", code, str(COMPVIS_FIXTURES), str(out), *names[i::2]])
                   for i in range(2)]
        assert [w.wait(timeout=900) for w in workers] == [0, 0]

    out = shared_path(tmp_path_factory, "compvis", build)
    assert "pytorch_lightning" not in sys.modules
    return out
