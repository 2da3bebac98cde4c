"""Model cards and Hub uploads, built on ``huggingface_hub``."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
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


def _render_card(template: str, repo_id: str, *, pipeline_tag: str | None, tags: list[str],
                 datasets: list[str] | None = None, base_model: str | None = None, **fields):
    """A ``huggingface_hub.ModelCard`` from ``model_cards/templates/<template>``, with the Hub metadata every
    card here shares (diffusers library, Apache-2.0, ldm-diffusers / latent-diffusion tags)."""
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(library_name="diffusers", license="apache-2.0", pipeline_tag=pipeline_tag,
                              tags=["ldm-diffusers", "latent-diffusion", *tags], datasets=datasets,
                              base_model=base_model)
    return ModelCard.from_template(card_data, template_path=str(template_path(template)),
                                   model_name=repo_id.split("/")[-1], repo_id=repo_id, **fields)


def autoencoder_model_card(model, args, results: dict, repo_id: str):
    """A ``huggingface_hub.ModelCard`` for a trained stage-1 autoencoder, from ``autoencoder.md``."""
    from .models.autoencoders import is_vq_config

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


def hub_base_model(*candidates: str | None) -> str | None:
    """The first of ``candidates`` that names a Hub repository ("org/name", not a local folder or a
    built-in model), for a card's ``base_model``; None if none does."""
    for candidate in candidates:
        if (candidate and candidate.count("/") == 1 and not candidate.startswith(("builtin:", ".", "/"))
                and not Path(candidate).exists()):
            return candidate
    return None


def _component_description(model) -> tuple[str, list[str], str | None, list[tuple[str, object]]]:
    """(description, tags, pipeline tag, table rows) for one pipeline component."""
    from .conditioning.class_label import ClassEmbedder
    from .conditioning.layout import LayoutEncoder
    from .models.autoencoders import is_vq_config, latent_scaling_factor
    from .models.unet import LDMUNet2DConditionModel

    config = model.config
    if isinstance(model, LDMUNet2DConditionModel):
        return (
            f"The denoising UNet eps_theta(z_t, t, context): latents [B, {model.latent_channels}, h, w]"
            + (f" with {model.concat_channels} concatenated conditioning channels" if model.concat_channels else "")
            + f" and a timestep in 0..999 -> predicted noise [B, {model.latent_channels}, h, w].",
            ["unet"], None,  # not runnable on its own: no pipeline tag, so the Hub offers no widget for it
            [("block channels", list(config.block_out_channels)), ("cross-attention width", model.context_dim),
             ("concatenated channels", model.concat_channels)],
        )
    if isinstance(model, ClassEmbedder):
        return (f"The class-label encoder tau_theta: labels [B] in 0..{config.num_classes - 1} -> tokens "
                f"[B, 1, {config.context_dim}] for cross-attention (row {config.num_classes} is the null class).",
                ["conditioning", "class-conditional"], None, [("classes", config.num_classes)])
    if isinstance(model, LayoutEncoder):
        return (f"The layout encoder tau_theta: up to {config.max_objects} (class, box) pairs -> tokens "
                f"[B, L, {config.context_dim}] for cross-attention.",
                ["conditioning", "layout-to-image"], None, [("object classes", config.num_classes)])
    if hasattr(model, "downsampling_factor"):
        kind = "vq" if is_vq_config(config) else "kl"
        rows = [("downsampling factor f", model.downsampling_factor),
                ("latent channels", model.latent_channels_for_diffusion),
                ("scaling factor", _fmt(latent_scaling_factor(model), 6))]
        if kind == "vq":
            rows.append(("codebook", f"{config.num_vq_embeddings} codes"))
        return (f"A {'VQ' if kind == 'vq' else 'KL'}-regularised first-stage autoencoder: images [B, 3, H, W] in "
                f"[-1, 1] <-> latents [B, {model.latent_channels_for_diffusion}, H/{model.downsampling_factor}, "
                f"W/{model.downsampling_factor}].",
                ["autoencoder", f"{kind}-regularized"], "image-to-image", rows)
    raise TypeError(f"No model card for {type(model).__name__}: not an ldm-diffusers component.")


def component_model_card(model, repo_id: str, base_model: str | None = None, datasets: list[str] | None = None):
    """A ``huggingface_hub.ModelCard`` for one saved component (UNet, autoencoder, conditioning encoder)."""
    description, tags, pipeline_tag, rows = _component_description(model)
    bases = [c.__name__ for c in type(model).__mro__ if c.__module__.startswith("diffusers.")]
    return _render_card(
        "component.md",
        repo_id,
        pipeline_tag=pipeline_tag,
        tags=tags,
        datasets=datasets,
        base_model=base_model,
        description=description,
        class_name=type(model).__name__,
        base_class=bases[0] if bases else "ModelMixin",
        parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
        details=[(k, v) for k, v in rows if v is not None],
    )


class ComponentCardMixin:
    """diffusers' ``push_to_hub`` for a model, with this package's model card (:func:`component_model_card`,
    Hub metadata included) in place of diffusers' generic one."""

    def _upload_folder(self, working_dir, repo_id: str, token=None, commit_message=None, create_pr=False,
                       subfolder=None):
        if not subfolder:  # a component pushed into a pipeline's subfolder leaves the pipeline's card alone
            component_model_card(self, repo_id).save(Path(working_dir) / "README.md")
        return super()._upload_folder(working_dir, repo_id, token=token, commit_message=commit_message,
                                      create_pr=create_pr, subfolder=subfolder)


def pipeline_model_card(pipe, repo_id: str, extra_text: str = "", datasets: list[str] | None = None,
                        base_model: str | None = None):
    """A ``huggingface_hub.ModelCard`` for an :class:`~ldm_diffusers.LDMPipeline`, from ``pipeline.md``."""
    encoders = [(n, type(getattr(pipe, n)).__name__) for n in ("text_encoder", "class_embedder", "layout_encoder")
                if getattr(pipe, n, None) is not None]
    concat = pipe.unet.config.in_channels - pipe.unet.config.out_channels
    if pipe.text_encoder is not None:
        conditioning, tag, usage = "text prompts", "text-to-image", 'image = pipe("an emoji of a red apple", guidance_scale=3.0).images[0]'
    elif pipe.class_embedder is not None:
        conditioning, tag, usage = "class labels", "unconditional-image-generation", "image = pipe(class_labels=[0], guidance_scale=3.0).images[0]"
    elif pipe.layout_encoder is not None:
        conditioning, tag, usage = "layouts", "text-to-image", "image = pipe(layout=[(0, (0.1, 0.1, 0.6, 0.7))]).images[0]"
    elif concat:
        conditioning, tag, usage = "a spatially aligned input", "image-to-image", "image = pipe(image=low_res_image).images[0]"
    else:
        conditioning, tag, usage = "nothing (unconditional)", "unconditional-image-generation", "image = pipe().images[0]"
    from .models.autoencoders import is_vq_config, latent_scaling_factor
    from .models.unet import unet_cross_attends

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


class HubLoadError(OSError):
    """A pipeline could not be fetched from the Hub; the message names the repository and what to do."""


def _hub_error(err: BaseException):
    """The huggingface_hub or network error behind ``err`` (diffusers re-raises them as plain ``OSError``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if (type(err).__module__.startswith(("huggingface_hub", "httpx", "httpcore"))
                or isinstance(err, (ConnectionError, TimeoutError))):
            return err
        err = err.__cause__ or err.__context__
    return None


def _missing_file(err: BaseException) -> str:
    match = re.search(r"/resolve/[^/\s]+/(\S+?)\.?(\s|$)", str(err))
    return f"'{match.group(1)}'" if match else "a file it needs"


@contextmanager
def hub_download_errors(repo_id: str, revision: str | None = None, cache_dir=None, subfolder: str | None = None):
    """Around downloads of ``repo_id``: an error says which repository, revision and server were asked and what
    to do (``HubLoadError``), and snapshot folders this download created are removed, so that a half-filled one
    is never taken for the whole model by a later ``HF_HUB_OFFLINE=1`` / ``local_files_only=True`` load."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshots = cache / "snapshots"
    existing = set(snapshots.iterdir()) if snapshots.is_dir() else set()
    where = (f"'{repo_id}'" + (f" (subfolder '{subfolder}')" if subfolder else "")
             + (f" at revision '{revision}'" if revision else "") + f" on {constants.ENDPOINT}")
    try:
        yield where
    except Exception as err:
        for partial in (set(snapshots.iterdir()) if snapshots.is_dir() else set()) - existing:
            shutil.rmtree(partial, ignore_errors=True)
        for leftover in (cache / "blobs").glob("*.incomplete") if (cache / "blobs").is_dir() else []:
            leftover.unlink(missing_ok=True)
        cause = _hub_error(err)
        if isinstance(err, HubLoadError) or cause is None:
            raise
        if isinstance(cause, GatedRepoError):
            message = f"{where} is gated: accept its terms on the Hub and pass token= (or run `hf auth login`)."
        elif isinstance(cause, RevisionNotFoundError):
            message = f"{where}: no such revision. Pass an existing branch, tag or commit sha as revision=."
        elif isinstance(cause, RepositoryNotFoundError):
            message = (f"{where} was not found: check the repository id, the revision"
                       + (" and subfolder=" if subfolder else "")
                       + " (a private repository also needs token= or `hf auth login`).")
        elif isinstance(cause, LocalEntryNotFoundError):
            message = (f"{where} could not be reached and is not in the local cache ({cache}): check the network and "
                       "HF_ENDPOINT, or load it once while online (afterwards HF_HUB_OFFLINE=1 works).")
        elif isinstance(cause, EntryNotFoundError):
            message = (f"{where} has no file {_missing_file(cause)}: check subfolder= and the repository's files "
                       "(a model saved with save_pretrained or pushed with push_to_hub has config.json and "
                       "diffusion_pytorch_model.safetensors).")
        else:
            message = f"Downloading {where} failed ({type(cause).__name__}: {cause}). Nothing partial was kept; try again."
        raise HubLoadError(message) from err


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
