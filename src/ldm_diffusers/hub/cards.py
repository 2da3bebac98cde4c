"""The autoencoder's model card and its upload, and the ``base_model`` of cards, built on ``huggingface_hub``.

The card of a single component is in :mod:`ldm_diffusers.utils.model_cards`, a pipeline's in
:mod:`ldm_diffusers.pipelines.model_card`, downloads in :mod:`ldm_diffusers.utils.hub_download`.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import create_repo, upload_folder

from ..models.autoencoders import is_vq_config, load_autoencoder
from ..utils.model_cards import _fmt, _render_card


def autoencoder_model_card(model, args, results: dict, repo_id: str):
    """A ``huggingface_hub.ModelCard`` for a trained stage-1 autoencoder, from ``autoencoder.md``."""
    is_vq = is_vq_config(model.config)
    regularization = "vq" if is_vq else "kl"
    dataset = args.dataset_name or ("local imagefolder" if args.train_data_dir else "Noto Color Emoji (built-in)")
    return _render_card(
        "autoencoder.md",
        repo_id,
        pipeline_tag="image-to-image",
        tags=["autoencoder", f"{regularization}-regularized"],
        datasets=[args.dataset_name] if args.dataset_name and args.dataset_name != "emoji" else None,
        base_model=hub_base_model(args.pretrained_model_name_or_path),
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


def hub_base_model(*candidates: str | None) -> str | None:
    """The first of ``candidates`` that names a Hub repository ("org/name", not a local folder or a
    built-in model), for a card's ``base_model``; None if none does."""
    for candidate in candidates:
        if (candidate and candidate.count("/") == 1 and not candidate.startswith(("builtin:", ".", "/"))
                and not Path(candidate).exists()):
            return candidate
    return None
