"""Pushing to a Hub over real HTTP: huggingface_hub's own upload code against the test write server
(tests/hub_write_server.py), then pulling what was pushed from olah itself."""

import numpy as np
import pytest
import torch
from conftest import _point_huggingface_hub_at, tiny_kl
from huggingface_hub import ModelCard

from ldm_diffusers import LDMAutoencoderKL, LDMPipeline


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, value in sa.items():
        assert torch.equal(value, sb[name]), name


def _pull_from_olah(writable_hub, tmp_path, monkeypatch):
    """From here on huggingface_hub talks to olah directly, with a fresh cache."""
    _point_huggingface_hub_at(writable_hub.hub.endpoint, tmp_path / "pull", monkeypatch)


def _sample(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("an emoji of a cat", num_inference_steps=2, guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_pipeline_push_to_hub_then_pull(writable_hub, tmp_path, monkeypatch):
    from test_pipeline import make_pipe

    pipe = make_pipe("prompt")
    info = pipe.push_to_hub("org/pushed-ldm", model_card_text="A tiny test pipeline.")
    assert info.oid == writable_hub.head("org/pushed-ldm", "main")
    puts = [p for m, p in writable_hub.requests if m == "PUT"]
    assert len(puts) == 3  # unet, vae and text-encoder safetensors by LFS; configs, tokenizer, card as regular files
    # the same weights again: every LFS object is on the server already, so nothing is uploaded twice
    pipe.push_to_hub("org/pushed-ldm", commit_message="same weights", model_card_text="A tiny test pipeline.")
    assert [p for m, p in writable_hub.requests if m == "PUT"] == puts

    _pull_from_olah(writable_hub, tmp_path, monkeypatch)
    pulled = LDMPipeline.from_pretrained("org/pushed-ldm")
    for name in ("unet", "vae", "text_encoder"):
        _weights_equal(getattr(pulled, name), getattr(pipe, name))
    assert np.array_equal(_sample(pulled), _sample(pipe))
    card = ModelCard.load("org/pushed-ldm")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert "A tiny test pipeline." in card.text


def test_model_push_to_hub_then_pull(writable_hub, tmp_path, monkeypatch):
    vae = tiny_kl(4)
    vae.push_to_hub("org/pushed-vae")
    _pull_from_olah(writable_hub, tmp_path, monkeypatch)
    pulled = LDMAutoencoderKL.from_pretrained("org/pushed-vae")
    _weights_equal(pulled, vae)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(pulled(x, sample_posterior=False).sample, vae(x, sample_posterior=False).sample)


def test_push_needs_a_token_and_an_existing_repo(writable_hub, monkeypatch):
    from huggingface_hub import create_commit, CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.utils._auth._get_token_from_file", lambda: None)
    with pytest.raises(HfHubHTTPError, match="401"):
        tiny_kl(4).push_to_hub("org/no-token")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with pytest.raises(RepositoryNotFoundError):
        create_commit("org/never-created", [CommitOperationAdd("a.txt", b"a")], commit_message="x")
