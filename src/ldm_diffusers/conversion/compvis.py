"""``convert_compvis_checkpoint``: a released CompVis checkpoint + its YAML config -> this package's models.

The config is read as data (``yaml.safe_load``, then its keys); ``target:`` strings only select which converter
applies, nothing is imported or instantiated from them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

from ..conditioning import ClassEmbedder, LayoutBERTEncoder, SpatialRescaler, bert_tokenizer
from ..models.autoencoders import LDMAutoencoderKL, LDMVQModel
from ..pipelines import LDMPipeline
from ..schedulers import compvis_ddim_scheduler
from ..utils.model_cards import _render_card, component_model_card
from ..utils.model_files import CheckpointError, atomic_directory, publish_directory
from .ckpt_loader import load_compvis_ckpt, state_dict_of
from .first_stage import autoencoder_config, convert_first_stage_state_dict
from .unet import convert_unet_state_dict, unet_config

FIRST_STAGE_TARGETS = ("ldm.models.autoencoder.AutoencoderKL", "ldm.models.autoencoder.VQModel",
                       "ldm.models.autoencoder.VQModelInterface", "taming.models.vqgan.VQModel")
LATENT_DIFFUSION_TARGETS = ("ldm.models.diffusion.ddpm.LatentDiffusion",)


def read_compvis_config(path: str | os.PathLike) -> dict:
    """The YAML config as plain data; ``model.target`` and ``model.params`` must be there."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No config at '{path}': pass the .yaml that came with the checkpoint.")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"'{path}' is not valid YAML ({err}).") from err
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "target" not in config["model"]:
        raise ValueError(f"'{path}' has no model.target: not a CompVis latent-diffusion config.")
    return config


def load_exactly(model, weights: dict, part: str):
    """``model`` (in eval mode) with ``weights`` loaded, every parameter and buffer and nothing else."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"The checkpoint's {part} does not fit its config: missing {sorted(missing)[:8]}, unexpected "
            f"{sorted(unexpected)[:8]}. Is this the config that came with the checkpoint?"
        )
    return model.eval()


def convert_first_stage(state: dict, params: dict, prefix: str = ""):
    """An ``LDMAutoencoderKL`` / ``LDMVQModel`` with the CompVis first-stage weights under ``prefix`` in ``state``."""

    kind, config = autoencoder_config(params)
    model = (LDMVQModel if kind == "vq" else LDMAutoencoderKL)(**config)
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    weights = convert_first_stage_state_dict(own, len(config["block_out_channels"]))
    return load_exactly(model, weights, "first stage")


# Buffers of CompVis' LatentDiffusion that the scheduler recomputes from linear_start / linear_end.
SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "scale_factor", "model_ema.decay",
                    "model_ema.num_updates"}


def unet_weights(state: dict, use_ema: bool) -> dict:
    """``model.diffusion_model.*`` (keys relative to ``diffusion_model.``), with the EMA values in their place when
    ``use_ema`` and the checkpoint has them (``model_ema.<name without dots>``)."""
    weights = {k[len("model.diffusion_model."):]: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    if not weights:
        raise CheckpointError("The checkpoint has no model.diffusion_model.* weights: not a LatentDiffusion checkpoint.")
    has_ema = any(k.startswith("model_ema.") for k in state)
    if use_ema and has_ema:
        ema = {k: state.get("model_ema." + ("diffusion_model." + k).replace(".", "")) for k in weights}
        missing = [k for k, v in ema.items() if v is None]
        if missing:
            raise CheckpointError(f"The checkpoint's EMA copy lacks {len(missing)} weights (e.g. {missing[0]}); "
                                  "convert with use_ema=False (--no_ema) to take the training weights.")
        weights = ema
    return weights


def convert_latent_diffusion(state: dict, params: dict, use_ema: bool = True):
    """An ``LDMPipeline`` from a CompVis ``LatentDiffusion`` checkpoint: first stage with the LDM's scale factor
    (from the checkpoint when ``scale_by_std``, else the config, default 1.0), eps_theta, CompVis' DDIM."""

    encoders = convert_cond_stage(state, params)
    if params.get("beta_schedule", "linear") != "linear":  # CompVis' "linear" is diffusers' "scaled_linear"
        raise NotImplementedError(f"beta_schedule '{params['beta_schedule']}' is not supported; every released CompVis "
                                  "model uses 'linear' (linspace of square roots, squared).")
    if params.get("parameterization", "eps") != "eps":
        raise NotImplementedError(f"parameterization '{params['parameterization']}' is not supported (CompVis: eps).")
    vae = convert_first_stage(state, params["first_stage_config"]["params"], prefix="first_stage_model.")
    scale = float(state["scale_factor"]) if params.get("scale_by_std") else float(params.get("scale_factor", 1.0))
    vae.register_to_config(scaling_factor=scale)
    unet_params = params["unet_config"]["params"]
    unet_class, config = unet_config(unet_params)
    unet = unet_class(**config)
    weights = convert_unet_state_dict(unet_weights(state, use_ema), unet_params)
    load_exactly(unet, weights, "UNet")
    placed = ("model.diffusion_model.", "model_ema.", "first_stage_model.", "cond_stage_model.")
    left = sorted(k for k in state if not k.startswith(placed) and k not in SCHEDULE_BUFFERS)
    if left:
        raise CheckpointError(f"Keys of the checkpoint that no part of this model takes: {left[:8]}.")
    scheduler = compvis_ddim_scheduler(params.get("linear_start", 0.0015), params.get("linear_end", 0.0195),
                                       params.get("timesteps", 1000))
    return LDMPipeline(vae=vae, unet=unet, scheduler=scheduler, **encoders)


ENCODERS = "ldm.modules.encoders.modules."


def convert_cond_stage(state: dict, params: dict) -> dict:
    """The pipeline components of tau_theta (``cond_stage_config``), by what the config says it is:

    * ``__is_unconditional__``; ``torch.nn.Identity`` with concat conditioning (super-resolution: the low-resolution
      image itself); ``__is_first_stage__`` with concat (inpainting: the first stage encodes the masked image; the
      checkpoint repeats its weights under ``cond_stage_model.``): no component;
    * ``ClassEmbedder`` -> ``class_embedder``; ``BERTEmbedder`` with its tokenizer -> ``text_encoder`` + ``tokenizer``,
      without (layouts) -> ``layout_encoder``; ``SpatialRescaler`` -> ``segmentation_encoder``."""
    cond_stage = params.get("cond_stage_config")
    target = cond_stage.get("target") if isinstance(cond_stage, dict) else cond_stage
    cond_params = (cond_stage.get("params") if isinstance(cond_stage, dict) else None) or {}
    concat = params.get("conditioning_key", "concat" if params.get("concat_mode", True) else None) == "concat"
    if target == "__is_unconditional__" or (target == "torch.nn.Identity" and concat):
        return {}
    if target == "__is_first_stage__" and concat:
        for key, value in state.items():
            if key.startswith("cond_stage_model.") and not torch.equal(
                    value, state.get("first_stage_model." + key[len("cond_stage_model."):], torch.empty(0))):
                raise CheckpointError(f"'{key}' differs from the first stage's weight: a cond stage declared "
                                      "__is_first_stage__ must be the first stage.")
        return {}
    if target == ENCODERS + "ClassEmbedder":
        return {"class_embedder": convert_class_embedder(state, cond_params)}
    if target == ENCODERS + "BERTEmbedder" and cond_params.get("use_tokenizer", True):
        tokenizer = bert_tokenizer()  # bert-base-uncased WordPiece, as CompVis' BERTTokenizer
        tokenizer.model_max_length = cond_params.get("max_seq_len", 77)
        return {"text_encoder": convert_bert_embedder(state, cond_params), "tokenizer": tokenizer}
    if target == ENCODERS + "BERTEmbedder":
        return {"layout_encoder": convert_layout_embedder(state, cond_params)}
    if target == ENCODERS + "SpatialRescaler":
        rescaler = SpatialRescaler(**cond_params)
        own = {k[len("cond_stage_model."):]: v for k, v in state.items() if k.startswith("cond_stage_model.")}
        return {"segmentation_encoder": load_exactly(rescaler, own, "SpatialRescaler")}
    raise NotImplementedError(f"The conditioning stage {target} (conditioning_key "
                              f"{params.get('conditioning_key')}) is not one of the released CompVis models'.")


def convert_bert_embedder(state: dict, params: dict):
    """CompVis' BERTEmbedder (an x-transformers encoder: token + learned absolute position embeddings, pre-norm
    layers of 8 heads x 64 whatever the width, GELU feed-forward 4 x width, final LayerNorm, no attention mask) as
    diffusers' ``LDMBertModel``, the same architecture diffusers uses for CompVis' text2im repository."""

    return load_exactly(LDMBertModel(bert_embedder_config(state, params)), bert_embedder_weights(state, params),
                        "BERTEmbedder")


def bert_embedder_config(state: dict, params: dict):
    """The ``LDMBertConfig`` of a checkpoint's BERTEmbedder (widths from its config, vocabulary and positions from
    its embedding tables)."""

    width = params.get("n_embed", 1280)
    return LDMBertConfig(vocab_size=state["cond_stage_model.transformer.token_emb.weight"].shape[0], d_model=width,
                         encoder_layers=params.get("n_layer", 32), encoder_ffn_dim=4 * width, encoder_attention_heads=8,
                         head_dim=64, dropout=0.0,
                         max_position_embeddings=state["cond_stage_model.transformer.pos_emb.emb.weight"].shape[0])


def bert_embedder_names(layers: int) -> dict[str, str]:
    """BERTEmbedder weight names (below ``cond_stage_model.transformer.``) -> ``LDMBertModel``'s."""
    names = {"token_emb.weight": "model.embed_tokens.weight", "pos_emb.emb.weight": "model.embed_positions.weight",
             "norm.weight": "model.layer_norm.weight", "norm.bias": "model.layer_norm.bias",
             "to_logits.weight": "to_logits.weight", "to_logits.bias": "to_logits.bias"}
    sublayers = {(0, "0"): "self_attn_layer_norm", (0, "1.to_q"): "self_attn.q_proj", (0, "1.to_k"): "self_attn.k_proj",
                 (0, "1.to_v"): "self_attn.v_proj", (0, "1.to_out"): "self_attn.out_proj",
                 (1, "0"): "final_layer_norm", (1, "1.net.0.0"): "fc1", (1, "1.net.2"): "fc2"}
    for i in range(layers):  # x-transformers alternates attention (2i) and feed-forward (2i + 1) blocks
        for (which, sub), name in sublayers.items():
            for what in ("weight", "bias"):
                names[f"attn_layers.layers.{2 * i + which}.{sub}.{what}"] = f"model.layers.{i}.{name}.{what}"
    return names


def bert_embedder_weights(state: dict, params: dict) -> dict:
    """The BERTEmbedder's weights under ``LDMBertModel``'s names."""
    prefix = "cond_stage_model.transformer."
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    names = bert_embedder_names(params.get("n_layer", 32))
    unknown = sorted(set(own) - set(names))
    if unknown:
        raise CheckpointError(f"Unknown BERTEmbedder keys {unknown[:6]}: not the CompVis text encoder layout.")
    return {names[k]: v for k, v in own.items()}


def convert_layout_embedder(state: dict, params: dict):
    """CompVis' layout BERTEmbedder (no tokenizer; taming's bounding-box tokens) as ``LayoutBERTEncoder``."""

    config = bert_embedder_config(state, params)
    if config.max_position_embeddings % 3 != 2:
        raise CheckpointError(f"A layout encoder of {config.max_position_embeddings} positions: taming's builder "
                              "writes 3 tokens per object plus 2 crop tokens.")
    encoder = LayoutBERTEncoder(vocab_size=config.vocab_size, max_objects=(config.max_position_embeddings - 2) // 3,
                                d_model=config.d_model, num_layers=config.encoder_layers)
    weights = {f"transformer.{k}": v for k, v in bert_embedder_weights(state, params).items()}
    return load_exactly(encoder, weights, "layout BERTEmbedder")


def convert_class_embedder(state: dict, params: dict):
    """CompVis' ClassEmbedder (``nn.Embedding(n_classes, D)``, one token) as ours. cin256-v2's 1001 classes are 1000
    and the null class 1000 it was trained to drop labels to; cin256's 1000 have no null class (no guidance)."""

    weight = state["cond_stage_model.embedding.weight"]
    n_classes = params.get("n_classes", weight.shape[0])
    has_null = n_classes == 1001  # ImageNet's 1000 classes + the null class, as the cin256-v2 config documents
    embedder = ClassEmbedder(num_classes=n_classes - int(has_null), context_dim=weight.shape[1], has_null_class=has_null)
    embedder.load_state_dict({"embedding.weight": weight})
    return embedder.eval()


def save_converted(model, output_dir: str | os.PathLike, checkpoint_path, config_path, use_ema: bool = True,
                   dtype=None) -> Path:
    """``save_pretrained`` of a converted autoencoder or ``LDMPipeline`` into ``output_dir`` (written aside, then
    renamed into place), with a model card naming the source checkpoint (and its sha256), the config, the paper and
    which of the checkpoint's weights were taken."""



    output_dir = Path(output_dir)
    digest = hashlib.sha256()
    with open(checkpoint_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    source = dict(checkpoint=Path(checkpoint_path).name, sha256=digest.hexdigest(), config=Path(config_path).name,
                  target=read_compvis_config(config_path)["model"]["target"], license="mit")
    tmp = atomic_directory(output_dir)
    model.to(dtype or torch.float32).save_pretrained(tmp, safe_serialization=True)
    if isinstance(model, DiffusionPipeline):
        conditioning, tag = model.mode.conditioned_on, model.mode.pipeline_tag
        parts = [(name, type(part).__name__) for name, part in model.components.items() if part is not None]
        card = _render_card(
            "converted.md", output_dir.name, pipeline_tag=tag, tags=["compvis", "converted", "diffusers:LDMPipeline"],
            description=f"A latent diffusion model conditioned on {conditioning}.", class_name=type(model).__name__,
            base_class="DiffusionPipeline", details=parts,
            parameters=f"{sum(p.numel() for m in model.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()) / 1e6:.1f}M",
            weights="the EMA copy of eps_theta (model_ema.*) where the checkpoint has one, else the training weights"
            if use_ema else "the training weights of eps_theta (model.*), not the EMA copy", **source,
        )
    else:
        card = component_model_card(model, output_dir.name, template="converted.md", extra_tags=("compvis", "converted"),
                                    weights="the autoencoder's (training-only loss.* dropped)", **source)
    card.save(tmp / "README.md")
    publish_directory(tmp, output_dir)
    return output_dir


def convert_compvis_checkpoint(checkpoint_path: str | os.PathLike, config_path: str | os.PathLike, use_ema: bool = True):
    """A released CompVis checkpoint (``.ckpt``, loaded without running its pickle, or ``.safetensors``) and its
    config -> an ``LDMAutoencoderKL`` / ``LDMVQModel`` for a first-stage config (``models/first_stage_models/*``).
    ``use_ema`` selects the EMA weights of a latent-diffusion checkpoint where it has them."""
    config = read_compvis_config(config_path)
    target, params = config["model"]["target"], config["model"].get("params") or {}
    state = state_dict_of(load_compvis_ckpt(checkpoint_path))
    if target in FIRST_STAGE_TARGETS:
        return convert_first_stage(state, params)
    if target in LATENT_DIFFUSION_TARGETS:
        return convert_latent_diffusion(state, params, use_ema)
    raise ValueError(f"model.target '{target}' is not a CompVis latent-diffusion model; known targets: "
                     f"{', '.join(FIRST_STAGE_TARGETS + LATENT_DIFFUSION_TARGETS)}.")
