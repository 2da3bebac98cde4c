"""Loading from a Hub over real HTTP: huggingface_hub's own client against olah (tests/local_hub.py)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ldm_diffusers import LDMPipeline, LDMUNet2DConditionModel

REPO = Path(__file__).resolve().parents[1]


def _sample(pipe, prompt="an emoji of red apple"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_pipeline_from_hub_equals_the_local_folder(local_hub, tmp_path):
    from test_pipeline import make_pipe

    folder = tmp_path / "saved"
    make_pipe("prompt").save_pretrained(folder)
    first = local_hub.publish(folder, "org/text-ldm", tag="v1")
    hub_pipe = LDMPipeline.from_pretrained("org/text-ldm")
    assert np.array_equal(_sample(hub_pipe), _sample(LDMPipeline.from_pretrained(folder)))
    # one component, from its subfolder
    unet = LDMUNet2DConditionModel.from_pretrained("org/text-ldm", subfolder="unet")
    for name, value in unet.state_dict().items():
        assert torch.equal(value, hub_pipe.unet.state_dict()[name]), name

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
    from test_pipeline import make_pipe

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
