"""``export_compvis_checkpoint``: this package's models -> a CompVis latent-diffusion checkpoint and its YAML config,
the inverse of :func:`~ldm_diffusers.conversion.convert_compvis_checkpoint`.

A component is written only where the CompVis code (latent-diffusion ``a506df5``) has its architecture. Each config is
checked with the converter's own config functions (``unet_config``, ``autoencoder_config``, ...): what ``convert``
would build from the exported config must be the component's config, so that ``convert(export(model))`` gives the
model back tensor for tensor. Weight names come from the converter's key maps, inverted. Anything CompVis cannot
express raises ``NotImplementedError`` naming the component and the reason; a noise schedule it cannot express raises
``ValueError``.
"""

from __future__ import annotations

import inspect
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from .compvis import ENCODERS, bert_embedder_config, bert_embedder_names, convert_class_embedder
from .first_stage import ATTENTION_NAMES, RESNET_NAMES, autoencoder_config, first_stage_key
from .unet import RESBLOCK_NAMES, block_map, attention_heads, unet_config

UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
# Settings only training reads (no weight shape depends on them): not compared; CompVis' UNetModel takes ``dropout``.
TRAINING_ONLY = {"dropout", "beta"}
HEAD_KEYS = {"attention_head_dim", "num_attention_heads", "attention_head_counts"}  # checked per level instead
# Why a config value has no CompVis counterpart, for the keys one is likely to meet.
REASONS = {
    "norm_num_groups": "every CompVis normalisation is a GroupNorm of 32 groups",
    "use_linear_projection": "SpatialTransformer's proj_in / proj_out are 1x1 convolutions, not linear layers",
    "addition_embed_type": "UNetModel adds no text / image / time-id embeddings to the timestep embedding",
    "class_embed_type": "UNetModel adds no class embedding to the timestep embedding",
    "encoder_hid_dim_type": "UNetModel cross-attends to the context as it is, without a projection",
    "mid_block_add_attention": "every CompVis Encoder / Decoder has an AttnBlock in the middle unless attn_type none",
    "scaling_factor": "a CompVis autoencoder config has no latent scale (the LatentDiffusion config holds it as "
                      "scale_factor): export the pipeline, or register_to_config(scaling_factor=1.0) first",
    "has_null_class": "CompVis' ClassEmbedder has no null class; the converter reads one only as class 1000 of "
                      "n_classes 1001 (cin256-v2)",
}


def _plain(value):
    """Config values as plain YAML data (tuples -> lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _defaults(cls) -> dict:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _check_config(component: str, model, config: dict, cls, kwargs: dict, what: str, skip=frozenset()) -> None:
    """Raise ``NotImplementedError`` unless every key of ``config`` (``model``'s, normalised) is what the converter
    builds from the exported CompVis config: ``cls(**kwargs)``, defaults for the rest."""
    wanted, own = {**_defaults(cls), **kwargs}, _defaults(type(model))
    bad = []
    for key, value in config.items():
        want = wanted.get(key, own.get(key))  # a key the converter's class lacks: the model's default is fine
        if not key.startswith("_") and key not in skip and _plain(value) != _plain(want):
            bad.append(f"{key}={_plain(value)!r} where CompVis gives {_plain(want)!r}"
                       + (f" ({REASONS[key]})" if key in REASONS else ""))
    if bad:
        raise NotImplementedError(f"{component} ({type(model).__name__}) cannot be written as a CompVis {what}: "
                                  f"{'; '.join(bad)}.")


# -- first stage ---------------------------------------------------------------------------------------------------
def first_stage_params(vae, in_pipeline: bool) -> dict:
    """CompVis first-stage ``params`` (``embed_dim``, ``n_embed``, ``ddconfig``, ``lossconfig``) of an
    ``LDMAutoencoderKL`` / ``LDMVQModel``. ``in_pipeline``: its scaling factor goes to the LatentDiffusion config."""
    from ..models.autoencoders import is_vq_config, latent_scaling_factor

    config = dict(vae.config)
    vq = is_vq_config(config)
    widths, resolution = list(config["block_out_channels"]), config["sample_size"]
    if not isinstance(resolution, int):
        raise NotImplementedError(f"vae: sample_size {resolution}: CompVis' ddconfig.resolution is one side.")
    if any(w % widths[0] for w in widths):
        raise NotImplementedError(f"vae: block widths {widths} are not multiples of the first (CompVis: ch * ch_mult).")
    attention = ["Attn" in block for block in config["down_block_types"]]
    dd = {"double_z": not vq, "z_channels": config["latent_channels"], "resolution": resolution,
          "in_channels": config["in_channels"], "out_ch": config["out_channels"], "ch": widths[0],
          "ch_mult": [w // widths[0] for w in widths], "num_res_blocks": config["layers_per_block"],
          "attn_resolutions": [resolution // 2**i for i, a in enumerate(attention) if a], "dropout": 0.0}
    if not config["mid_block_add_attention"]:
        dd["attn_type"] = "none"
    params = {"embed_dim": config["latent_channels"]}
    if vq:
        config["vq_embed_dim"] = config["vq_embed_dim"] or config["latent_channels"]  # diffusers' default
        params.update(embed_dim=config["vq_embed_dim"], n_embed=config["num_vq_embeddings"])
    params.update(ddconfig=dd, lossconfig={"target": "torch.nn.Identity"})
    config["scaling_factor"] = latent_scaling_factor(vae)
    _, kwargs = autoencoder_config(params)
    _check_config("vae", vae, config, type(vae), kwargs, "Encoder / Decoder",
                  TRAINING_ONLY | ({"scaling_factor"} if in_pipeline else set()))
    return params


def first_stage_names(levels: int, num_res_blocks: int) -> dict[str, str]:
    """diffusers autoencoder weight name -> CompVis name: the converter's ``first_stage_key`` run over every key a
    CompVis Encoder / Decoder of ``levels`` levels can have (a superset; the model's keys pick from it)."""
    prefixes = [f"{part}.{layer}" for part in ("encoder", "decoder") for layer in ("conv_in", "norm_out", "conv_out")]
    prefixes += ["quant_conv", "post_quant_conv"]
    for part in ("encoder", "decoder"):
        prefixes += [f"{part}.mid.block_{b}.{layer}" for b in (1, 2) for layer in RESNET_NAMES]
        prefixes += [f"{part}.mid.attn_1.{layer}" for layer in ATTENTION_NAMES]
    for i in range(levels):
        for part, blocks, sampler in (("encoder.down", num_res_blocks, "downsample"),
                                      ("decoder.up", num_res_blocks + 1, "upsample")):
            prefixes += [f"{part}.{i}.block.{j}.{layer}" for j in range(blocks) for layer in RESNET_NAMES]
            prefixes += [f"{part}.{i}.attn.{j}.{layer}" for j in range(blocks) for layer in ATTENTION_NAMES]
            prefixes.append(f"{part}.{i}.{sampler}.conv")
    keys = [f"{prefix}.{what}" for prefix in prefixes for what in ("weight", "bias")] + ["quantize.embedding.weight"]
    return {first_stage_key(key, levels): key for key in keys}


def first_stage_state(vae) -> dict[str, torch.Tensor]:
    """The autoencoder's weights under CompVis' names (no prefix); AttnBlock q / k / v / proj_out become 1x1
    convolutions [C, C, 1, 1]."""
    names = first_stage_names(len(vae.config.block_out_channels), vae.config.layers_per_block)
    state = {}
    for name, value in vae.state_dict().items():
        if name not in names:
            raise NotImplementedError(f"vae: weight '{name}' has no place in a CompVis Encoder / Decoder.")
        state[names[name]] = value[:, :, None, None] if ".attentions." in name and value.ndim == 2 else value
    return state


# -- UNet ----------------------------------------------------------------------------------------------------------
def attention_heads_per_level(config) -> tuple[int, ...]:
    """Attention heads of each resolution level of a diffusers UNet config; the mid block uses the last level's.
    ``LDMUNet2DModel``: ``attention_head_counts``; ``UNet2DConditionModel`` (its config has ``cross_attention_dim``):
    ``attention_head_dim`` counts the heads of its cross-attention blocks; ``UNet2DModel``: ``attention_head_dim`` is
    the width of a head (None: one head per block)."""
    widths = config["block_out_channels"]
    if config.get("attention_head_counts"):
        return tuple(config["attention_head_counts"])
    if "cross_attention_dim" in config:
        heads = config.get("num_attention_heads") or config["attention_head_dim"]
        return tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * len(widths)
    dim = config.get("attention_head_dim")
    return tuple(1 if dim is None else w // dim for w in widths)


def compvis_heads(widths, heads, attention) -> dict:
    """``num_heads`` / ``num_head_channels`` (-1: unused) giving ``heads[i]`` at every level ``i`` with attention and
    in the middle block (the last level's width), as openaimodel.py computes them. One head count everywhere ->
    ``num_heads``; one head width everywhere -> ``num_head_channels``; of two that fit, the one that also gives the
    levels without attention their count (so the converter rebuilds the config exactly)."""
    used = [i for i, a in enumerate(attention) if a] + [len(widths) - 1]
    candidates = [{"num_heads": -1, "num_head_channels": widths[-1] // heads[-1]},
                  {"num_heads": heads[-1], "num_head_channels": -1}]

    def fits(c, w, h):
        return attention_heads(c, w) == h and (c["num_head_channels"] == -1 or w == h * c["num_head_channels"])

    fitting = [c for c in candidates if all(fits(c, widths[i], heads[i]) for i in used)]
    if not fitting:
        raise NotImplementedError(
            f"unet: attention heads {[heads[i] for i in used]} at widths {[widths[i] for i in used]} (levels with "
            "attention, then the middle): CompVis' UNetModel has one head count (num_heads) or one head width "
            "(num_head_channels) for all of them.")
    exact = [c for c in fitting if all(fits(c, w, h) for w, h in zip(widths, heads))]
    return (exact or fitting)[0]


def unet_params(unet) -> dict:
    """CompVis ``unet_config.params`` of eps_theta: ``UNet2DConditionModel`` -> SpatialTransformers (cross-attention);
    ``UNet2DModel`` / ``LDMUNet2DModel`` -> AttentionBlocks (``resnet_time_scale_shift="scale_shift"`` ->
    ``use_scale_shift_norm``, ``downsample_type="resnet"`` -> ``resblock_updown``)."""
    config = dict(unet.config)
    cross = "cross_attention_dim" in config
    if cross and config["mid_block_type"] != "UNetMidBlock2DCrossAttn":
        raise NotImplementedError(
            f"unet ({type(unet).__name__}): mid block {config['mid_block_type']} (a UNet2DConditionModel without "
            "cross-attention has a single ResnetBlock there): CompVis' UNetModel always has ResBlock, attention, "
            "ResBlock in the middle.")
    listed = [key for key in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim")
              if isinstance(config.get(key), (list, tuple))]
    if listed:
        raise NotImplementedError(f"unet: per-level {', '.join(listed)}: CompVis' UNetModel has one value for all levels.")
    widths = list(config["block_out_channels"])
    if any(w % widths[0] for w in widths):
        raise NotImplementedError(f"unet: block widths {widths} are not multiples of the first (CompVis: model_channels "
                                  "* channel_mult).")
    attention = ["Attn" in block for block in config["down_block_types"]]
    p = {"image_size": _plain(config["sample_size"]), "in_channels": config["in_channels"],
         "out_channels": config["out_channels"], "model_channels": widths[0],
         "attention_resolutions": [2**i for i, a in enumerate(attention) if a],  # downsampling factors
         "num_res_blocks": config["layers_per_block"], "channel_mult": [w // widths[0] for w in widths],
         **compvis_heads(widths, attention_heads_per_level(config), attention)}
    if cross:
        p.update(use_spatial_transformer=True, transformer_depth=config["transformer_layers_per_block"],
                 context_dim=config["cross_attention_dim"])
    else:
        p.update(use_scale_shift_norm=config["resnet_time_scale_shift"] == "scale_shift",
                 resblock_updown=config["downsample_type"] == "resnet")
        if config.get("attn_norm_num_groups") is None and config["resnet_time_scale_shift"] == "default":
            config["attn_norm_num_groups"] = config["norm_num_groups"]  # what diffusers uses then
    if config.get("dropout"):
        p["dropout"] = config["dropout"]
    cls, kwargs = unet_config(p)
    _check_config("unet", unet, config, cls, kwargs, "UNetModel", TRAINING_ONLY | HEAD_KEYS)
    return p


def unet_state(unet, p: dict) -> dict[str, torch.Tensor]:
    """eps_theta's weights under CompVis' names (relative to ``diffusion_model.``): the converter's block map
    inverted; AttentionBlock q, k, v [C, C] regrouped per head into ``qkv`` Conv1d [3C, C, 1] ([q_h, k_h, v_h] for each
    head h) and ``proj_out`` as Conv1d [C, C, 1]."""
    blocks = {target: (prefix, kind) for prefix, (target, kind) in block_map(p).items()}
    resblock = {ours: theirs for theirs, ours in RESBLOCK_NAMES.items()}
    state, qkv = {}, {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        cut = next((cut for cut in range(len(parts) - 1, 0, -1) if ".".join(parts[:cut]) in blocks), None)
        prefix, kind = blocks[".".join(parts[:cut])] if cut else (None, None)
        leaf = ".".join(parts[cut or 0:])
        layer, _, what = leaf.rpartition(".")
        if kind in ("layer", "transformer"):  # diffusers keeps CompVis' names below the block
            state[f"{prefix}.{leaf}"] = value
        elif kind == "res" and layer in resblock:
            state[f"{prefix}.{resblock[layer]}.{what}"] = value
        elif kind == "attn" and layer in ("to_q", "to_k", "to_v"):
            qkv.setdefault(f"{prefix}.qkv.{what}", {})[layer] = value
        elif kind == "attn" and layer in ("group_norm", "to_out.0"):
            name = "norm" if layer == "group_norm" else "proj_out"
            state[f"{prefix}.{name}.{what}"] = value[..., None] if value.ndim == 2 else value
        else:
            raise NotImplementedError(f"unet: weight '{key}' has no place in CompVis' UNetModel.")
    for name, parts in qkv.items():
        q, k, v = parts["to_q"], parts["to_k"], parts["to_v"]
        channels = q.shape[0]
        heads = attention_heads(p, channels)
        grouped = torch.stack([t.reshape(heads, channels // heads, *t.shape[1:]) for t in (q, k, v)], dim=1)
        weight = grouped.reshape(3 * channels, *q.shape[1:])
        state[name] = weight[..., None] if weight.ndim == 2 else weight
    return state


# -- conditioning stage --------------------------------------------------------------------------------------------
def _bert_embedder(component: str, encoder, use_tokenizer: bool) -> tuple[dict, dict]:
    """(BERTEmbedder params, weights under ``cond_stage_model.transformer.``) of an ``LDMBertModel``."""
    c = encoder.config
    params = {"n_embed": c.d_model, "n_layer": c.encoder_layers, "vocab_size": c.vocab_size,
              "max_seq_len": c.max_position_embeddings, "use_tokenizer": use_tokenizer}
    shapes = {"cond_stage_model.transformer.token_emb.weight": torch.empty(c.vocab_size, c.d_model, device="meta"),
              "cond_stage_model.transformer.pos_emb.emb.weight": torch.empty(c.max_position_embeddings, c.d_model,
                                                                             device="meta")}
    wanted = bert_embedder_config(shapes, params)
    arch = ("vocab_size", "max_position_embeddings", "d_model", "encoder_ffn_dim", "encoder_layers",
            "encoder_attention_heads", "head_dim", "activation_function", "scale_embedding")
    bad = [f"{key}={getattr(c, key)!r} where CompVis gives {getattr(wanted, key)!r}" for key in arch
           if getattr(c, key) != getattr(wanted, key)]
    if bad:
        raise NotImplementedError(f"{component} (LDMBertModel) cannot be written as a CompVis BERTEmbedder (8 heads of "
                                  f"64, feed-forward 4 x width, GELU): {'; '.join(bad)}.")
    names = {ours: theirs for theirs, ours in bert_embedder_names(c.encoder_layers).items()}
    return params, {f"cond_stage_model.transformer.{names[k]}": v for k, v in encoder.state_dict().items()}


def _text_stage(pipe) -> tuple[dict, dict]:
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

    from ..conditioning import bert_tokenizer
    from ..conditioning.text import MAX_LENGTH

    encoder = pipe.text_encoder
    if not isinstance(encoder, LDMBertModel):
        raise NotImplementedError(
            f"text_encoder ({type(encoder).__name__}): CompVis' only text encoder is its BERTEmbedder (diffusers' "
            f"LDMBertModel: pre-norm layers, q/k/v without bias, no token-type embeddings); {type(encoder).__name__} "
            "is another architecture, as are transformers' BERT, MiniLM and CLIP text models.")
    tokenizer = pipe.tokenizer
    if tokenizer is None or tokenizer.get_vocab() != bert_tokenizer().get_vocab():
        raise NotImplementedError(f"tokenizer ({type(tokenizer).__name__}): CompVis' BERTEmbedder tokenizes with "
                                  "bert-base-uncased's WordPiece vocabulary; this tokenizer has another.")
    positions = encoder.config.max_position_embeddings
    if min(tokenizer.model_max_length, MAX_LENGTH) != positions:
        raise NotImplementedError(f"tokenizer: prompts of {min(tokenizer.model_max_length, MAX_LENGTH)} tokens for a "
                                  f"text encoder of {positions} positions: CompVis' BERTEmbedder has one max_seq_len "
                                  "for both.")
    params, state = _bert_embedder("text_encoder", encoder, use_tokenizer=True)
    return {"target": ENCODERS + "BERTEmbedder", "params": params}, state


def _class_stage(pipe) -> tuple[dict, dict]:
    from ..conditioning import ClassEmbedder

    embedder = pipe.class_embedder
    if not isinstance(embedder, ClassEmbedder):
        raise NotImplementedError(f"class_embedder ({type(embedder).__name__}): CompVis' ClassEmbedder is one "
                                  "nn.Embedding table (ldm_diffusers.ClassEmbedder).")
    weight = embedder.embedding.weight.detach()
    params = {"embed_dim": weight.shape[1], "n_classes": weight.shape[0], "key": "class_label"}
    state = {"cond_stage_model.embedding.weight": weight}
    back = convert_class_embedder(state, params)
    _check_config("class_embedder", embedder, dict(embedder.config), ClassEmbedder, dict(back.config), "ClassEmbedder")
    return {"target": ENCODERS + "ClassEmbedder", "params": params}, state


def _layout_stage(pipe) -> tuple[dict, dict]:
    from ..conditioning import LayoutBERTEncoder

    encoder = pipe.layout_encoder
    if not isinstance(encoder, LayoutBERTEncoder):
        raise NotImplementedError(
            f"layout_encoder ({type(encoder).__name__}): CompVis' layout model reads taming's bounding-box tokens "
            "with a BERTEmbedder (ldm_diffusers.LayoutBERTEncoder); this encoder (class and box embeddings into a "
            "torch transformer) has no CompVis counterpart.")
    c = encoder.config
    _check_config("layout_encoder", encoder, dict(c), LayoutBERTEncoder,
                  {"vocab_size": c.vocab_size, "max_objects": c.max_objects, "d_model": c.d_model,
                   "num_layers": c.num_layers}, "BERTEmbedder (taming's builder's class count is not in its config)")
    params, state = _bert_embedder("layout_encoder", encoder.transformer, use_tokenizer=False)
    return {"target": ENCODERS + "BERTEmbedder", "params": params}, state


def _cond_stage(pipe, vae_state: dict) -> tuple[dict, dict, dict]:
    """(LatentDiffusion params for tau_theta, cond_stage_config, weights under ``cond_stage_model.``), by the
    pipeline's encoders: text, class and layout -> crossattn; segmentation, super-resolution, inpainting -> concat."""
    from ..models.autoencoders import is_vq_config, latent_scaling_factor
    from ..models.unet import unet_cross_attends

    encoders = [name for name in ("text_encoder", "class_embedder", "layout_encoder", "segmentation_encoder")
                if getattr(pipe, name, None) is not None]
    if len(encoders) > 1:
        raise NotImplementedError(f"{' and '.join(encoders)}: a CompVis LatentDiffusion has one conditioning stage.")
    unet = pipe.unet.config
    cross, concat = unet_cross_attends(unet), unet["in_channels"] - unet["out_channels"]
    crossattn = {"text_encoder": ("caption", _text_stage), "class_embedder": ("class_label", _class_stage),
                 "layout_encoder": ("coordinates_bbox", _layout_stage)}
    if encoders and encoders[0] in crossattn:
        if not cross or concat:
            raise NotImplementedError(f"unet: a {encoders[0]} pipeline whose UNet "
                                      + ("concatenates channels too" if cross else "does not cross-attend")
                                      + ": CompVis' crossattn conditioning feeds the context to SpatialTransformers only.")
        key, stage = crossattn[encoders[0]]
        config, state = stage(pipe)
        return {"cond_stage_key": key, "cond_stage_trainable": True, "conditioning_key": "crossattn"}, config, state
    if cross:
        raise NotImplementedError("unet: it cross-attends, but the pipeline has no encoder to give it a context.")
    if encoders:  # segmentation_encoder: CompVis' SpatialRescaler, the same module
        from ..conditioning import SpatialRescaler

        rescaler = pipe.segmentation_encoder
        if not isinstance(rescaler, SpatialRescaler):
            raise NotImplementedError(f"segmentation_encoder ({type(rescaler).__name__}): CompVis' is a SpatialRescaler.")
        params = {k: v for k, v in rescaler.config.items() if not k.startswith("_")}
        state = {f"cond_stage_model.{k}": v for k, v in rescaler.state_dict().items()}
        return ({"cond_stage_key": "segmentation", "cond_stage_trainable": True, "conditioning_key": "concat"},
                {"target": ENCODERS + "SpatialRescaler", "params": params}, state)
    if concat == 0:
        return {"cond_stage_key": "image", "cond_stage_trainable": False}, "__is_unconditional__", {}
    image, masked = concat == pipe.vae.config["in_channels"], concat == unet["out_channels"] + 1
    if image == masked:
        raise NotImplementedError(f"unet: {concat} concatenated channels are "
                                  + ("both a low-resolution image and a masked image's latents + mask" if image else
                                     "neither a low-resolution image (super-resolution) nor latents + mask (inpainting)")
                                  + ", the concat models CompVis has without an encoder.")
    if image:  # super-resolution: the low-resolution image itself
        return ({"cond_stage_key": "LR_image", "cond_stage_trainable": False, "conditioning_key": "concat"},
                {"target": "torch.nn.Identity"}, {})
    if not is_vq_config(pipe.vae.config) or latent_scaling_factor(pipe.vae) != 1.0:
        raise NotImplementedError(
            "inpainting with " + (f"a latent scale of {latent_scaling_factor(pipe.vae):g}: CompVis concatenates the "
                                  "first stage's encoding of the masked image unscaled" if is_vq_config(pipe.vae.config)
                                  else "a KL first stage: CompVis' inpainting (scripts/inpaint.py) concatenates "
                                  "cond_stage_model.encode(masked image), a tensor only for a VQ first stage") + ".")
    state = {f"cond_stage_model.{k}": v for k, v in vae_state.items()}  # __is_first_stage__: the first stage again
    return ({"cond_stage_key": "masked_image", "cond_stage_trainable": False, "conditioning_key": "concat"},
            "__is_first_stage__", state)


# -- schedule ------------------------------------------------------------------------------------------------------
def schedule_params(scheduler) -> dict:
    """``linear_start`` / ``linear_end`` / ``timesteps`` of a scheduler with CompVis' schedule (diffusers'
    ``scaled_linear``: beta linear in sqrt(beta)) and eps prediction; ``ValueError`` for any other."""
    c = scheduler.config
    problems = [f"beta_schedule '{c.get('beta_schedule')}' (CompVis' schedule is diffusers' scaled_linear)"
                if c.get("beta_schedule") != "scaled_linear" else "",
                "trained_betas (a table of its own)" if c.get("trained_betas") is not None else "",
                f"prediction_type '{c.get('prediction_type')}' (CompVis predicts epsilon)"
                if c.get("prediction_type", "epsilon") != "epsilon" else "",
                "rescale_betas_zero_snr" if c.get("rescale_betas_zero_snr") else "",
                f"variance_type '{c['variance_type']}' (CompVis' variance is fixed)"
                if str(c.get("variance_type")).startswith("learned") else ""]
    if any(problems):
        raise ValueError(f"scheduler ({type(scheduler).__name__}): CompVis' LatentDiffusion cannot express "
                         f"{', '.join(p for p in problems if p)}.")
    return {"linear_start": float(c["beta_start"]), "linear_end": float(c["beta_end"]),
            "timesteps": int(c["num_train_timesteps"])}


def schedule_buffers(linear_start: float, linear_end: float, timesteps: int) -> dict[str, torch.Tensor]:
    """The schedule buffers [timesteps] a CompVis LatentDiffusion checkpoint holds (``register_schedule``: float64,
    stored as float32), so that the file loads strictly."""
    betas = (torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2).numpy()
    alphas_cumprod = np.cumprod(1.0 - betas)
    prev = np.append(1.0, alphas_cumprod[:-1])
    variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    values = {"betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": prev,
              "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
              "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
              "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
              "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
              "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1), "posterior_variance": variance,
              "posterior_log_variance_clipped": np.log(np.maximum(variance, 1e-20)),
              "posterior_mean_coef1": betas * np.sqrt(prev) / (1.0 - alphas_cumprod),
              "posterior_mean_coef2": (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)}
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in values.items()}


# -- whole models --------------------------------------------------------------------------------------------------
def _first_stage_target(vae, in_pipeline: bool) -> str:
    from ..models.autoencoders import is_vq_config

    if not is_vq_config(vae.config):
        return "ldm.models.autoencoder.AutoencoderKL"
    return "ldm.models.autoencoder.VQModelInterface" if in_pipeline else "ldm.models.autoencoder.VQModel"


def compvis_latent_diffusion(pipe) -> tuple[dict, dict[str, torch.Tensor]]:
    """(CompVis config, state dict) of an ``LDMPipeline``: eps_theta's training weights (no EMA copy, ``use_ema:
    false``), the first stage, tau_theta and the schedule."""
    from ..models.autoencoders import latent_scaling_factor

    first_stage = first_stage_params(pipe.vae, in_pipeline=True)
    vae_state = first_stage_state(pipe.vae)
    cond, cond_config, cond_state = _cond_stage(pipe, vae_state)
    p = unet_params(pipe.unet)
    schedule = schedule_params(pipe.scheduler)
    params = {**schedule, "first_stage_key": "image", **cond, "image_size": p["image_size"],
              "channels": p["out_channels"], "scale_factor": latent_scaling_factor(pipe.vae), "use_ema": False,
              "unet_config": {"target": UNET_TARGET, "params": p},
              "first_stage_config": {"target": _first_stage_target(pipe.vae, True), "params": first_stage},
              "cond_stage_config": cond_config}
    state = {f"model.diffusion_model.{k}": v for k, v in unet_state(pipe.unet, p).items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae_state.items()})
    state.update(cond_state)
    state.update(schedule_buffers(**schedule))
    return {"model": {"target": LDM_TARGET, "params": params}}, state


def compvis_autoencoder(vae) -> tuple[dict, dict[str, torch.Tensor]]:
    """(CompVis config, state dict) of a stand-alone ``LDMAutoencoderKL`` / ``LDMVQModel``."""
    params = first_stage_params(vae, in_pipeline=False)
    return {"model": {"target": _first_stage_target(vae, False), "params": params}}, first_stage_state(vae)


def _load(model_or_folder):
    if not isinstance(model_or_folder, (str, os.PathLike)):
        return model_or_folder
    folder = Path(model_or_folder)
    if (folder / "model_index.json").is_file():
        from ..pipelines import LDMPipeline

        return LDMPipeline.from_pretrained(folder)
    if (folder / "config.json").is_file():
        from ..models.autoencoders import load_autoencoder

        return load_autoencoder(folder)
    raise FileNotFoundError(f"'{folder}' is neither a pipeline folder (model_index.json) nor an autoencoder folder "
                            "(config.json)." if folder.is_dir() else f"No folder at '{folder}'.")


def _write_atomically(path: Path, write) -> None:
    """``write(temporary path)``, then rename it to ``path``: a reader never sees half a file."""
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for key, value in state.items():  # safetensors refuses tensors that share memory (inpainting's two first stages)
        value = value.contiguous()
        pointer = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    save_file(tensors, str(path), metadata={"format": "pt"})


def export_compvis_checkpoint(model_or_folder, checkpoint_path: str | os.PathLike,
                              config_path: str | os.PathLike) -> tuple[Path, Path]:
    """Write an ``LDMPipeline`` / ``LDMAutoencoderKL`` / ``LDMVQModel`` (or a folder holding one) as a CompVis
    checkpoint and YAML config that ``convert_compvis_checkpoint`` and the CompVis code load. The checkpoint is
    ``{"state_dict": ..., "global_step": 0}`` (``torch.save``; plain tensors and containers), or the bare state dict
    for a ``.safetensors`` path. Both files are written aside, then renamed into place, once everything is mapped.
    Returns (checkpoint path, config path)."""
    import yaml
    from diffusers import AutoencoderKL, DiffusionPipeline, VQModel

    model = _load(model_or_folder)
    if isinstance(model, DiffusionPipeline):
        config, state = compvis_latent_diffusion(model)
    elif isinstance(model, (AutoencoderKL, VQModel)):
        config, state = compvis_autoencoder(model)
    else:
        raise TypeError(f"Expected an LDMPipeline, LDMAutoencoderKL or LDMVQModel, got {type(model).__name__}.")
    state = {key: value.detach().cpu() for key, value in state.items()}
    checkpoint_path, config_path = Path(checkpoint_path), Path(config_path)
    for path in (checkpoint_path, config_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    if checkpoint_path.suffix == ".safetensors":
        _write_atomically(checkpoint_path, lambda tmp: _save_safetensors(state, tmp))
    else:  # global_step: CompVis' scripts/sample_diffusion.py reads it
        _write_atomically(checkpoint_path, lambda tmp: torch.save({"state_dict": state, "global_step": 0}, tmp))
    text = yaml.safe_dump(_plain(config), sort_keys=False)
    _write_atomically(config_path, lambda tmp: tmp.write_text(text))
    return checkpoint_path, config_path
