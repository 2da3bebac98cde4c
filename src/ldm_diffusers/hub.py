"""Model cards and Hub uploads, built on ``huggingface_hub``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

TEMPLATE_DIRS = (
    # a source checkout / editable install: <repo>/model_cards/templates
    Path(__file__).resolve().parents[2] / "model_cards" / "templates",
    # a regular install: setup.cfg's data_files put the templates here
    Path(sys.prefix) / "share" / "ldm-diffusers" / "model_cards" / "templates",
)


def template_path(name: str) -> Path:
    for folder in TEMPLATE_DIRS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"Model card template '{name}' not found in {[str(d) for d in TEMPLATE_DIRS]}.")


def _fmt(value, digits=4):
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "n/a" if value is None else str(value)


def autoencoder_model_card(model, args, results: dict, repo_id: str):
    """A ``huggingface_hub.ModelCard`` for a trained stage-1 autoencoder, from ``autoencoder.md``."""
    from huggingface_hub import ModelCard, ModelCardData

    is_vq = "num_vq_embeddings" in model.config
    regularization = "vq" if is_vq else "kl"
    dataset = args.dataset_name or ("local imagefolder" if args.train_data_dir else "Noto Color Emoji (built-in)")
    card_data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        pipeline_tag="image-to-image",
        tags=["ldm-diffusers", "latent-diffusion", "autoencoder", f"{regularization}-regularized"],
        datasets=[args.dataset_name] if args.dataset_name and args.dataset_name != "emoji" else None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path("autoencoder.md")),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        regularization=regularization,
        regularization_title="VQ-regularised (VQGAN-style)" if is_vq else "KL-regularised",
        f=model.downsampling_factor,
        latent_channels=model.latent_channels_for_diffusion,
        codebook_size=model.config.get("num_vq_embeddings"),
        parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
        scaling_factor=_fmt(model.config.scaling_factor, 6),
        dataset=dataset,
        resolution=args.resolution,
        steps=results.get("steps"),
        pixel_loss=args.pixel_loss.upper(),
        perceptual_loss=args.perceptual_loss,
        disc_start=args.disc_start,
        kl_weight=args.kl_weight,
        beta=args.commitment_beta,
        num_images=results.get("num_images"),
        psnr=_fmt(results.get("psnr")),
        ssim=_fmt(results.get("ssim")),
        rfid=_fmt(results.get("rfid")),
        library_module="ldm_diffusers",
        class_name=type(model).__name__,
        base_class="VQModel" if is_vq else "AutoencoderKL",
    )


def push_autoencoder(output_dir: str | os.PathLike, args, results: dict) -> str:
    """Write README.md (the model card) into ``output_dir`` and upload the model, card, metrics and the
    last reconstruction grid (not the training checkpoints). Returns the repo id."""
    from huggingface_hub import create_repo, upload_folder

    from .models.autoencoders import load_autoencoder

    output_dir = Path(output_dir)
    repo_id = args.hub_model_id or output_dir.resolve().name
    repo_id = create_repo(repo_id, exist_ok=True, token=args.hub_token, private=args.hub_private).repo_id
    card = autoencoder_model_card(load_autoencoder(output_dir), args, results, repo_id)
    card.save(output_dir / "README.md")
    upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        token=args.hub_token,
        commit_message="Upload autoencoder trained with ldm-diffusers",
        allow_patterns=["config.json", "*.safetensors", "README.md", "eval_results.json", "validation/*.png"],
        ignore_patterns=["checkpoint-*/**", ".*"],
    )
    return repo_id
