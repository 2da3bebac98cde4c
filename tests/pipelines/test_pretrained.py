"""The emoji pipelines that ship inside the package: text-to-image, and one per other mode."""

import configparser
import fnmatch

import numpy as np
import pytest
import torch
from helpers.paths import REPO
from PIL import Image
from safetensors import safe_open

from ldm_diffusers import LDMPipeline
from ldm_diffusers.cli import main
from ldm_diffusers.pretrained import (MODELS, SHARED_AUTOENCODER, pretrained_components, pretrained_model_path,
                                      pretrained_root)


def test_shipped_weights_are_small_half_precision_safetensors():
    folder = pretrained_model_path()
    assert {p.parent.name for p in folder.rglob("*.safetensors")} == {"unet", "vae", "text_encoder"}
    for name in MODELS[1:]:  # the other modes' models take the shared autoencoder
        assert not (pretrained_model_path(name) / "vae").exists()
        assert pretrained_components(pretrained_model_path(name)) == {"vae": pretrained_root() / SHARED_AUTOENCODER}
    files = [p for p in pretrained_root().rglob("*") if p.is_file() and "__pycache__" not in p.parts
             and p.suffix != ".py"]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert sum(p.stat().st_size for p in weights) < 100 * 2**20  # all built-in models together
    for path in weights:
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path
    # every file is package data, so a non-editable install carries it
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    patterns = [p.strip() for p in config["options.package_data"]["ldm_diffusers.pretrained"].split(",")]
    for path in files:
        rel = path.relative_to(pretrained_root()).as_posix()
        assert any(fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns), rel


def test_builtin_model_loads_in_float32_and_samples_deterministically():
    pipe = LDMPipeline.from_pretrained("builtin:emoji-text-to-image")
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe("an emoji of red heart", num_inference_steps=4, guidance_scale=3.0, output_type="np",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images
    first, second = run(), run()
    assert first.shape == (1, 64, 64, 3) and np.array_equal(first, second)
    # guidance does something: the unconditional and conditional predictions differ
    plain = pipe("an emoji of red heart", num_inference_steps=4, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert np.abs(plain - first).mean() > 1e-3
    half = LDMPipeline.from_pretrained(pretrained_model_path(), dtype=torch.float16)
    assert half.unet.dtype == torch.float16


def test_generate_uses_the_builtin_model_by_default(tmp_path):
    out = tmp_path / "apple.png"
    main(["generate", "an emoji of a red apple", "--steps", "3", "--out", str(out)])
    assert Image.open(out).size == (64, 64)


def test_unknown_builtin_name_is_a_clear_error():
    with pytest.raises(ValueError, match="builtin:emoji-text-to-image"):
        LDMPipeline.from_pretrained("builtin:nope")


TASKS = {"emoji-text-to-image": "text-to-image", "emoji-super-resolution": "image-to-image",
         "emoji-inpainting": "image-to-image", "emoji-class": "unconditional-image-generation"}


@pytest.mark.parametrize("name", MODELS)
def test_model_card_metadata_and_numbers(name):
    from huggingface_hub import ModelCard

    card = ModelCard.load(REPO / "model_cards" / f"ldm-{name}.md")
    data = card.data
    assert data.library_name == "diffusers" and data.license == "apache-2.0" and data.pipeline_tag == TASKS[name]
    assert {"ldm-diffusers", "diffusers:LDMPipeline"} <= set(data.tags)
    assert (REPO / "model_cards" / f"ldm-{name}-samples.png").is_file()
    size_mb = sum(p.stat().st_size for p in pretrained_model_path(name).rglob("*.safetensors")) / 1e6
    assert f"{size_mb:.1f} MB" in card.text  # the card states the shipped size
    assert "CPU hours" in card.text and "RESULTS_TABLE" not in card.text


def emoji(name: str, size: int) -> torch.Tensor:
    """A real emoji rendered at ``size``, [1, 3, size, size] in [0, 1]."""
    from ldm_diffusers.data import pil_to_tensor, render_emoji

    return (pil_to_tensor(render_emoji(name, size), size)[None] + 1) / 2


def test_builtin_super_resolution_upscales_its_input():
    pipe = LDMPipeline.from_pretrained("builtin:emoji-super-resolution")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.mode.name == "super_resolution" and pipe.vae_scale_factor == 4
    low, other = emoji("\N{RED APPLE}", 16), emoji("\N{GRINNING FACE}", 16)
    out = pipe(image=low * 2 - 1, num_inference_steps=10, output_type="pt",  # tensors in [-1, 1]
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 64, 64)
    bicubic = lambda x: torch.nn.functional.interpolate(x, scale_factor=4, mode="bicubic").clamp(0, 1)  # noqa: E731
    # the 64x64 result is an upscaled apple: nearer the apple's bicubic upsampling and its 64x64 rendering than
    # another emoji's (measured: 0.076 against 0.153, and 0.070 against 0.17)
    assert (out - bicubic(low)).abs().mean() < (out - bicubic(other)).abs().mean()
    apple, face = emoji("\N{RED APPLE}", 64), emoji("\N{GRINNING FACE}", 64)
    assert (out - apple).abs().mean() < (out - face).abs().mean()
