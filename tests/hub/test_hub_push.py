"""Pushing to a Hub over real HTTP: huggingface_hub's own upload code against the test write server
(tests/helpers/hub_write_server.py), then pulling what was pushed from olah itself."""

import subprocess

import numpy as np
import pytest
import torch
from helpers.local_hub import point_huggingface_hub_at
from helpers.models import assert_same_weights, tiny_kl
from helpers.scripts import example_main, reset_accelerate_state
from huggingface_hub import ModelCard

from ldm_diffusers import LDMAutoencoderKL, LDMPipeline


def _pull_from_olah(writable_hub, tmp_path, monkeypatch):
    """From here on huggingface_hub talks to olah directly, with a fresh cache."""
    point_huggingface_hub_at(writable_hub.hub.endpoint, tmp_path / "pull", monkeypatch)


def _sample(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("an emoji of a cat", num_inference_steps=2, guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_pipeline_push_to_hub_then_pull(writable_hub, tmp_path, monkeypatch):
    from helpers.models import make_pipe

    pipe = make_pipe("prompt")
    with torch.no_grad():  # weights no other test pushes: the session's server keeps every LFS object it was sent
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            for param in module.parameters():
                param.add_(0.25)
    info = pipe.push_to_hub("org/pushed-ldm", model_card_text="A tiny test pipeline.")
    assert info.oid == writable_hub.head("org/pushed-ldm", "main")
    puts = [p for m, p in writable_hub.requests if m == "PUT"]
    assert len(puts) == 3  # unet, vae and text-encoder safetensors by LFS; configs, tokenizer, card as regular files
    # the same weights again: every LFS object is on the server already, so nothing is uploaded twice
    pipe.push_to_hub("org/pushed-ldm", commit_message="same weights", model_card_text="A tiny test pipeline.")
    assert [p for m, p in writable_hub.requests if m == "PUT"] == puts

    files = _repo_files(writable_hub, "org/pushed-ldm")
    assert {"model_index.json", "README.md", "unet/diffusion_pytorch_model.safetensors"} <= set(files)
    assert not any(f.endswith(".bin") for f in files)

    _pull_from_olah(writable_hub, tmp_path, monkeypatch)
    pulled = LDMPipeline.from_pretrained("org/pushed-ldm")
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pulled, name), getattr(pipe, name))
    assert np.array_equal(_sample(pulled), _sample(pipe))
    card = ModelCard.load("org/pushed-ldm")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert "A tiny test pipeline." in card.text


def test_model_push_to_hub_then_pull(writable_hub, tmp_path, monkeypatch):
    vae = tiny_kl(4)
    vae.push_to_hub("org/pushed-vae")
    _pull_from_olah(writable_hub, tmp_path, monkeypatch)
    pulled = LDMAutoencoderKL.from_pretrained("org/pushed-vae")
    assert_same_weights(pulled, vae)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(pulled(x, sample_posterior=False).sample, vae(x, sample_posterior=False).sample)


def test_push_needs_a_token_and_an_existing_repo(writable_hub, monkeypatch):
    from huggingface_hub import CommitOperationAdd, create_commit
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.utils._auth._get_token_from_file", lambda: None)
    with pytest.raises(HfHubHTTPError, match="401"):
        tiny_kl(4).push_to_hub("org/no-token")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with pytest.raises(RepositoryNotFoundError):
        create_commit("org/never-created", [CommitOperationAdd("a.txt", b"a")], commit_message="x")


def _repo_files(writable_hub, repo_id: str) -> list[str]:
    return subprocess.run(["git", "ls-tree", "-r", "--name-only", "main"], cwd=writable_hub.hub.repo_path(repo_id),
                          check=True, capture_output=True, text=True).stdout.split()


def test_training_scripts_push_and_the_pushes_pull_back(writable_hub, emoji16, tmp_path, monkeypatch,
                                                         fresh_accelerate_state):
    """Stage 1 trains and pushes its autoencoder; stage 2 trains on that autoencoder *from the Hub* and pushes
    the pipeline; both come back from olah with the weights the scripts saved."""
    from helpers.training import stage1_args as stage1_args
    from helpers.training import stage2_args as stage2_args

    from ldm_diffusers import load_autoencoder

    ae_dir, ldm_dir = tmp_path / "stage1", tmp_path / "stage2"
    monkeypatch.delenv("HF_TOKEN")  # the write server needs a token: the one given on the command line
    example_main("train_autoencoder.py")(stage1_args(
        emoji16, ae_dir, "-f", "4", "--max_train_steps", "2", "--checkpointing_steps", "1", "--perceptual_loss",
        "none", "--skip_rfid", "--report_to", "none", "--push_to_hub", "--hub_model_id", "org/script-vae",
        "--hub_token", "hf_given_on_the_command_line"))
    assert "hf_given_on_the_command_line" in writable_hub.tokens
    files = _repo_files(writable_hub, "org/script-vae")
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md", "eval_results.json"} <= set(files)
    assert not any(f.startswith("checkpoint-") for f in files)  # training state stays local
    assert writable_hub.validated[-1] == ([], [])  # the card's metadata passed the Hub's checks on upload

    reset_accelerate_state()
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    example_main("train_text_to_image.py")(stage2_args(
        "org/script-vae", emoji16, ldm_dir, "--max_train_steps", "2", "--push_to_hub", "--hub_model_id",
        "org/script-ldm"))
    assert writable_hub.validated[-1] == ([], [])
    assert not any(f.startswith("checkpoint-") for f in _repo_files(writable_hub, "org/script-ldm"))

    _pull_from_olah(writable_hub, tmp_path, monkeypatch)
    assert_same_weights(LDMAutoencoderKL.from_pretrained("org/script-vae"), load_autoencoder(ae_dir))
    pulled, saved = LDMPipeline.from_pretrained("org/script-ldm"), LDMPipeline.from_pretrained(ldm_dir)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pulled, name), getattr(saved, name))
    vae_card, ldm_card = ModelCard.load("org/script-vae"), ModelCard.load("org/script-ldm")
    assert "kl-regularized" in vae_card.data.tags and vae_card.data.pipeline_tag == "image-to-image"
    assert ldm_card.data.base_model == "org/script-vae"  # stage 2 names the Hub autoencoder it was trained on
    assert "text conditioning" in ldm_card.text and "2 steps" in ldm_card.text


def test_a_broken_push_commits_nothing_and_a_retry_completes_it(writable_hub, tmp_path, monkeypatch):
    from helpers.models import make_pipe

    pipe = make_pipe("class")
    with torch.no_grad():  # weights no earlier test pushed, so every object has to go up
        for p in pipe.unet.parameters():
            p.mul_(1.5)
    writable_hub.fail_uploads = 1
    with pytest.raises(RuntimeError, match="Error while uploading") as err:
        pipe.push_to_hub("org/interrupted")
    assert "broken off" in str(err.value.__cause__)
    assert _repo_files(writable_hub, "org/interrupted") == [".gitattributes"]  # no half-pushed pipeline
    pipe.push_to_hub("org/interrupted")
    _pull_from_olah(writable_hub, tmp_path, monkeypatch)
    assert_same_weights(LDMPipeline.from_pretrained("org/interrupted").unet, pipe.unet)
