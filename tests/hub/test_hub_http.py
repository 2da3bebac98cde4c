"""Loading from a Hub over real HTTP: huggingface_hub's own client against olah (tests/helpers/local_hub.py)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from helpers.models import assert_same_weights
from helpers.paths import REPO

from ldm_diffusers import LDMPipeline, LDMUNet2DConditionModel


def _sample(pipe, prompt="an emoji of red apple"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_pipeline_from_hub_equals_the_local_folder(local_hub, tmp_path):
    from helpers.models import make_pipe

    folder = tmp_path / "saved"
    make_pipe("prompt").save_pretrained(folder)
    first = local_hub.publish(folder, "org/text-ldm", tag="v1")
    hub_pipe = LDMPipeline.from_pretrained("org/text-ldm")
    assert np.array_equal(_sample(hub_pipe), _sample(LDMPipeline.from_pretrained(folder)))
    # one component, from its subfolder
    unet = LDMUNet2DConditionModel.from_pretrained("org/text-ldm", subfolder="unet")
    assert_same_weights(unet, hub_pipe.unet)

    # a new commit on main; the tag and the old sha still give the first weights
    changed = make_pipe("prompt")
    with torch.no_grad():
        for p in changed.unet.parameters():
            p.add_(0.1)
    changed.save_pretrained(tmp_path / "changed")
    local_hub.publish(tmp_path / "changed", "org/text-ldm", message="update")
    latest = LDMPipeline.from_pretrained("org/text-ldm")
    assert not np.array_equal(_sample(latest), _sample(hub_pipe))
    for revision in ("v1", first):
        old = LDMPipeline.from_pretrained("org/text-ldm", revision=revision)
        assert np.array_equal(_sample(old), _sample(hub_pipe)), revision


def test_second_load_and_offline_mode_use_the_cache(local_hub, tmp_path):
    from helpers.models import make_pipe

    make_pipe("class").save_pretrained(tmp_path / "saved")
    local_hub.publish(tmp_path / "saved", "org/class-ldm")
    LDMPipeline.from_pretrained("org/class-ldm")
    fetched = lambda: (local_hub.root / "olah.log").read_text().count(".safetensors HTTP")  # noqa: E731
    before = fetched()
    assert before >= 3  # unet, vae, class embedder weights came over HTTP
    LDMPipeline.from_pretrained("org/class-ldm")
    assert fetched() == before  # the second load reads the weights from the cache
    # with the server's address still set, HF_HUB_OFFLINE=1 must load from the cache alone
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    code = ("from ldm_diffusers import LDMPipeline; p = LDMPipeline.from_pretrained('org/class-ldm'); "
            "print(type(p.class_embedder).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ClassEmbedder" in result.stdout


def _snapshots(cache: Path, repo_id: str) -> list:
    folder = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_errors_name_the_repository_and_leave_nothing_partial(local_hub, tmp_path, monkeypatch):
    import pytest
    from helpers.models import make_pipe
    from huggingface_hub import _snapshot_download, constants

    from ldm_diffusers.utils.hub_download import HubLoadError

    cache = Path(constants.HF_HUB_CACHE)
    with pytest.raises(HubLoadError, match="'org/missing'.*not found.*repository id"):
        LDMPipeline.from_pretrained("org/missing")
    make_pipe("class").save_pretrained(tmp_path / "saved")
    local_hub.publish(tmp_path / "saved", "org/errors")
    with pytest.raises(HubLoadError, match="'org/errors' at revision 'no-such-branch'"):
        LDMPipeline.from_pretrained("org/errors", revision="no-such-branch")
    # a repository that holds files but no pipeline
    (tmp_path / "not-a-pipeline").mkdir()
    (tmp_path / "not-a-pipeline" / "README.md").write_text("hello\n")
    local_hub.publish(tmp_path / "not-a-pipeline", "org/readme-only")
    with pytest.raises(HubLoadError, match="no model_index.json.*subfolder='unet'"):
        LDMPipeline.from_pretrained("org/readme-only")
    assert _snapshots(cache, "org/readme-only") == []

    # the download breaks off after two files: the half-filled snapshot is removed, so an offline load
    # afterwards fails instead of loading part of a pipeline
    real = _snapshot_download.hf_hub_download
    calls = []

    def flaky(*args, **kwargs):
        calls.append(kwargs.get("filename"))
        if len(calls) > 2:
            raise ConnectionError("connection reset by peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(_snapshot_download, "hf_hub_download", flaky)
    with pytest.raises(HubLoadError, match="'org/errors'.*Nothing partial was kept"):
        LDMPipeline.from_pretrained("org/errors")
    assert len(calls) > 2 and _snapshots(cache, "org/errors") == []  # (files are fetched by a thread pool)
    monkeypatch.setattr(_snapshot_download, "hf_hub_download", real)

    # server down: nothing listens on the endpoint
    from helpers.local_hub import free_port

    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", down)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", down + "/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(HubLoadError, match=f"'org/errors' on {down} could not be reached.*HF_HUB_OFFLINE=1"):
        LDMPipeline.from_pretrained("org/errors")
    assert _snapshots(cache, "org/errors") == []


def test_component_and_file_errors_name_the_repository(local_hub, tmp_path, monkeypatch):
    import shutil

    import pytest
    from helpers.models import make_pipe
    from huggingface_hub import constants

    from ldm_diffusers import LDMAutoencoderKL, load_autoencoder
    from ldm_diffusers.utils.hub_download import HubLoadError

    cache = Path(constants.HF_HUB_CACHE)
    folder = tmp_path / "saved"
    make_pipe("class").save_pretrained(folder)
    # a pipeline whose unet weights were never uploaded: refused, and no snapshot kept for an offline load
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    local_hub.publish(folder, "org/no-unet-weights")
    with pytest.raises(HubLoadError, match=r"'org/no-unet-weights'.*incomplete.*unet/\*\.safetensors.*push_to_hub"):
        LDMPipeline.from_pretrained("org/no-unet-weights")
    assert _snapshots(cache, "org/no-unet-weights") == []
    # single components: a missing weights file, a wrong subfolder, a missing repository, a wrong revision
    with pytest.raises(HubLoadError, match=r"'org/no-unet-weights' \(subfolder 'unet'\).*no file "
                                           r"'unet/diffusion_pytorch_model.safetensors'.*subfolder="):
        LDMUNet2DConditionModel.from_pretrained("org/no-unet-weights", subfolder="unet")
    assert _snapshots(cache, "org/no-unet-weights") == []  # the config it did fetch is not left as a snapshot
    # (olah answers a file in a folder that does not exist like a missing repository, 401; the Hub says 404)
    with pytest.raises(HubLoadError, match=r"\(subfolder 'vea'\).*not found.*subfolder="):
        LDMAutoencoderKL.from_pretrained("org/no-unet-weights", subfolder="vea")
    with pytest.raises(HubLoadError, match=r"'org/nothing-here'.*not found"):
        load_autoencoder("org/nothing-here")  # reads the config first to pick KL or VQ
    with pytest.raises(HubLoadError, match=r"'org/no-unet-weights' \(subfolder 'vae'\) at revision 'v9'"):
        LDMAutoencoderKL.from_pretrained("org/no-unet-weights", subfolder="vae", revision="v9")
    shutil.rmtree(cache, ignore_errors=True)
    # the component that is there loads, and equals the local one
    vae = LDMAutoencoderKL.from_pretrained("org/no-unet-weights", subfolder="vae")
    local = LDMAutoencoderKL.from_pretrained(folder / "vae")
    assert_same_weights(vae, local)
