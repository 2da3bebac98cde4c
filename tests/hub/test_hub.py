"""Model cards: what they say, and their Hub metadata through huggingface_hub's own ``ModelCard.validate``
(which asks the Hub's ``/api/validate-yaml``; here the test write server, tests/helpers/hub_write_server.py)."""


import pytest
from helpers.models import tiny_kl, tiny_vq
from helpers.paths import REPO
from huggingface_hub import ModelCard

from ldm_diffusers.hub import autoencoder_model_card
from ldm_diffusers.pipelines.model_card import pipeline_model_card
from ldm_diffusers.training.autoencoder import build_parser
from ldm_diffusers.utils.model_cards import component_model_card


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
        assert parsed.data.base_model is None  # trained from scratch


def _every_card():
    """(name, card, expected pipeline tag) for each kind of card the package writes."""
    from helpers.models import concat_pipe, make_pipe, tiny_unet

    from ldm_diffusers import LayoutEncoder, LDMPipeline, ldm_scheduler

    layout = LDMPipeline(vae=tiny_kl(4, latent_channels=3), unet=tiny_unet(context_dim=16),
                         scheduler=ldm_scheduler("ddim", "text"),
                         layout_encoder=LayoutEncoder(num_classes=5, context_dim=16, max_objects=4, num_bins=8,
                                                      depth=1, num_heads=2))
    pipes = {"text": make_pipe("prompt"), "class": make_pipe("class"), "unconditional": make_pipe("unconditional"),
             "layout": layout, "super-resolution": concat_pipe(3), "inpainting": concat_pipe(4)}
    tags = {"text": "text-to-image", "class": "unconditional-image-generation", "layout": "text-to-image",
            "unconditional": "unconditional-image-generation", "super-resolution": "image-to-image",
            "inpainting": "image-to-image"}
    for mode, pipe in pipes.items():
        yield f"pipeline-{mode}", pipeline_model_card(pipe, "org/p"), tags[mode]
    yield ("pipeline-finetuned", pipeline_model_card(pipes["text"], "org/p", datasets=["org/emoji-captions"],
                                                     base_model="org/base-ldm"), "text-to-image")
    args = build_parser().parse_args(["--dataset_name", "org/images", "--pretrained_model_name_or_path", "org/vae"])
    for name, model in (("kl", tiny_kl(4)), ("vq", tiny_vq(4))):
        yield f"autoencoder-{name}", autoencoder_model_card(model, args, {"steps": 3}, "org/ae"), "image-to-image"
        yield f"component-{name}", component_model_card(model, "org/c"), "image-to-image"
    for name in ("unet", "class_embedder"):
        yield f"component-{name}", component_model_card(getattr(pipes["class"], name), "org/c"), None
    yield "component-layout_encoder", component_model_card(layout.layout_encoder, "org/c"), None
    yield "shipped", ModelCard.load(REPO / "model_cards" / "ldm-emoji-text-to-image.md"), "text-to-image"


def test_every_model_card_passes_the_hubs_metadata_validation(writable_hub):
    cards = {}
    for name, card, pipeline_tag in _every_card():
        card = ModelCard(str(card))  # as the Hub reads README.md
        card.validate()  # raises ValueError with the Hub's reasons
        assert writable_hub.validated[-1] == ([], []), name  # no errors and no warnings
        data = card.data
        assert data.library_name == "diffusers" and data.license == "apache-2.0", name
        assert {"ldm-diffusers", "latent-diffusion"} <= set(data.tags), name
        assert data.pipeline_tag == pipeline_tag, name
        cards[name] = data
    assert len(cards) == 15
    assert cards["pipeline-finetuned"].base_model == "org/base-ldm"
    assert cards["pipeline-finetuned"].datasets == ["org/emoji-captions"]
    assert cards["autoencoder-kl"].base_model == "org/vae" and cards["autoencoder-kl"].datasets == ["org/images"]


def test_the_validation_rejects_what_the_hub_rejects(writable_hub):
    from helpers.hub_write_server import hub_vocabulary, metadata_errors

    vocabulary = hub_vocabulary()  # the Hub's own lists, from its npm packages
    assert {"text-to-image", "image-to-image", "unconditional-image-generation"} <= vocabulary["pipeline_tag"]
    assert "diffusers" in vocabulary["library_name"] and "apache-2.0" in vocabulary["license"]
    bad = ModelCard("---\nlicense: apache\npipeline_tag: text2image\nlibrary_name: diffusers\n"
                    "base_model: not a repo id\ndatasets: []\n---\n# bad\n")
    with pytest.raises(ValueError) as err:
        bad.validate()
    for field in ("license", "pipeline_tag", "base_model", "datasets"):
        assert f'"{field}"' in str(err.value)
    broken = "---\nlicense: [apache-2.0\n---\n# broken\n"
    with pytest.raises(Exception, match="flow sequence"):
        ModelCard(broken)  # huggingface_hub refuses broken YAML before asking the Hub
    assert metadata_errors(broken, vocabulary)[0][0].startswith("invalid YAML")  # and so would the server
    assert metadata_errors("# no metadata\n", vocabulary) == ([], ["empty or missing yaml metadata in repo card"])
