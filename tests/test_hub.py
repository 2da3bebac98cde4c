import argparse

from conftest import tiny_kl, tiny_vq
from huggingface_hub import ModelCard

from ldm_diffusers.hub import autoencoder_model_card
from ldm_diffusers.training.autoencoder import build_parser


def test_autoencoder_model_cards_render_with_hub_metadata():
    args = build_parser().parse_args([])
    results = {"steps": 100, "num_images": 8, "psnr": 25.1234, "ssim": 0.9, "rfid": 12.5}
    for model, title, base in ((tiny_kl(4), "KL-regularised", "AutoencoderKL"), (tiny_vq(4), "VQ-regularised", "VQModel")):
        model.register_to_config(scaling_factor=0.5)
        card = autoencoder_model_card(model, args, results, "org/ae")
        text = str(card)
        assert title in text and base in text and "25.12" in text and "f = 4" in text
        parsed = ModelCard(text)
        assert parsed.data.library_name == "diffusers"
        assert "ldm-diffusers" in parsed.data.tags
        assert parsed.data.license == "apache-2.0"


def test_push_autoencoder_uploads_model_and_card_but_not_checkpoints(tmp_path, monkeypatch):
    # The upload itself is exercised against a local Hub server in the Hub-sharing tests; here the
    # huggingface_hub calls are recorded to check what would be sent.
    import huggingface_hub

    from ldm_diffusers.hub import push_autoencoder

    calls = {}

    def create_repo(repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: calls.setdefault("upload", kwargs))
    model = tiny_kl(4)
    model.save_pretrained(tmp_path)
    (tmp_path / "checkpoint-5").mkdir()
    args = build_parser().parse_args(["--hub_model_id", "org/my-vae", "--push_to_hub"])
    assert push_autoencoder(tmp_path, args, {"steps": 5, "psnr": 20.0}) == "org/my-vae"
    assert calls["create"][0] == "org/my-vae"
    upload = calls["upload"]
    assert upload["repo_id"] == "org/my-vae" and upload["folder_path"] == str(tmp_path)
    assert "*.safetensors" in upload["allow_patterns"] and "README.md" in upload["allow_patterns"]
    assert not any(p.startswith("checkpoint") for p in upload["allow_patterns"])
    assert "KL-regularised" in (tmp_path / "README.md").read_text()
