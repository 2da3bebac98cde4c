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
