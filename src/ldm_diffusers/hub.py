"""Pipeline-level model cards, Hub uploads and downloads, built on ``huggingface_hub``.

It sits above the models; the card of a single component is in :mod:`ldm_diffusers.utils.model_cards` and the
download errors in :mod:`ldm_diffusers.utils.hub_errors`, which the models use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .models.autoencoders import is_vq_config, latent_scaling_factor, load_autoencoder
from .models.unet import unet_cross_attends
from .utils.hub_errors import HubLoadError, hub_download_errors
from .utils.model_cards import _fmt, _render_card


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
    from huggingface_hub import create_repo, upload_folder

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


def pipeline_task(pipe) -> tuple[str, str, str]:
    """(what the pipeline is conditioned on, its Hub pipeline tag, a one-line usage example): its mode's."""
    mode = pipe.mode
    return mode.conditioned_on, mode.pipeline_tag, mode.usage


def pipeline_model_card(pipe, repo_id: str, extra_text: str = "", datasets: list[str] | None = None,
                        base_model: str | None = None):
    """A ``huggingface_hub.ModelCard`` for an :class:`~ldm_diffusers.LDMPipeline`, from ``pipeline.md``."""
    encoders = [(n, type(module).__name__) for n, module in pipe.components.items()
                if module is not None and n not in ("vae", "unet", "scheduler", "tokenizer")]
    concat = pipe.unet.config.in_channels - pipe.unet.config.out_channels
    conditioning, tag, usage = pipeline_task(pipe)
    sched = pipe.scheduler.config
    return _render_card(
        "pipeline.md",
        repo_id,
        pipeline_tag=tag,
        tags=["diffusers:LDMPipeline"],
        datasets=datasets,
        base_model=base_model,
        vae_kind="VQ-regularised" if is_vq_config(pipe.vae.config) else "KL-regularised",
        vae_class=type(pipe.vae).__name__,
        f=pipe.vae_scale_factor,
        latent_channels=pipe.unet.config.out_channels,
        scaling_factor=_fmt(latent_scaling_factor(pipe.vae), 6),
        unet_class=type(pipe.unet).__name__,
        unet_params=f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f}M",
        context_dim=pipe.unet.config.cross_attention_dim if unet_cross_attends(pipe.unet.config) else None,
        concat_channels=concat,
        encoders=encoders,
        conditioning=conditioning,
        scheduler_class=type(pipe.scheduler).__name__,
        beta_start=sched.beta_start,
        beta_end=sched.beta_end,
        beta_schedule=sched.beta_schedule,
        prediction_type=sched.prediction_type,
        extra_text=extra_text,
        usage=usage,
    )


def _incomplete_components(folder: Path) -> list[str]:
    """Components that model_index.json lists but the downloaded folder lacks (or lacks weights for)."""
    index = json.loads((folder / "model_index.json").read_text())
    missing = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        component = folder / name
        if not component.is_dir() or not any(component.iterdir()):
            missing.append(f"{name}/")
        elif (component / "config.json").is_file() and not any(component.glob("*.safetensors")):
            missing.append(f"{name}/*.safetensors")
    return missing


def download_pipeline(repo_id: str, ignore_patterns: list[str], revision: str | None = None, **kwargs) -> Path:
    """``snapshot_download`` of a pipeline repository into the Hub cache, returning its folder; errors as in
    :func:`hub_download_errors`, and a repository that lacks a listed component (or its weights) is refused."""
    from huggingface_hub import snapshot_download

    with hub_download_errors(repo_id, revision, kwargs.get("cache_dir")) as where:
        folder = Path(snapshot_download(repo_id, revision=revision, ignore_patterns=ignore_patterns, **kwargs))
        if not (folder / "model_index.json").is_file():
            raise HubLoadError(
                f"{where} has no model_index.json, so it is not a saved pipeline. Load a single component with its "
                f"class and subfolder (e.g. LDMUNet2DConditionModel.from_pretrained('{repo_id}', subfolder='unet')), "
                "or push a whole pipeline with LDMPipeline.push_to_hub."
            )
        missing = _incomplete_components(folder)
        if missing:
            raise HubLoadError(
                f"{where} is incomplete: model_index.json lists components whose files are not in the repository "
                f"({', '.join(missing)}). Push the whole pipeline again with LDMPipeline.push_to_hub (safetensors "
                "only: pickle weights are not downloaded)."
            )
        return folder
