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

import os
import uuid
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers import AutoencoderKL, DiffusionPipeline, VQModel
from safetensors.torch import save_file

from ..models.autoencoders import is_vq_config, latent_scaling_factor, load_autoencoder
from ..pipelines import LDMPipeline
from .cond_stage_export import cond_stage
from .config_checks import HEAD_KEYS, TRAINING_ONLY, check_config, plain
from .first_stage import ATTENTION_NAMES, RESNET_NAMES, autoencoder_config, first_stage_key
from .unet import RESBLOCK_NAMES, attention_heads, block_map, unet_config

UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
# -- first stage ---------------------------------------------------------------------------------------------------
def first_stage_params(vae, in_pipeline: bool) -> dict:
    """CompVis first-stage ``params`` (``embed_dim``, ``n_embed``, ``ddconfig``, ``lossconfig``) of an
    ``LDMAutoencoderKL`` / ``LDMVQModel``. ``in_pipeline``: its scaling factor goes to the LatentDiffusion config."""
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
    check_config("vae", vae, config, type(vae), kwargs, "Encoder / Decoder",
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
    p = {"image_size": plain(config["sample_size"]), "in_channels": config["in_channels"],
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
    check_config("unet", unet, config, cls, kwargs, "UNetModel", TRAINING_ONLY | HEAD_KEYS)
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
    if not is_vq_config(vae.config):
        return "ldm.models.autoencoder.AutoencoderKL"
    return "ldm.models.autoencoder.VQModelInterface" if in_pipeline else "ldm.models.autoencoder.VQModel"


def compvis_latent_diffusion(pipe) -> tuple[dict, dict[str, torch.Tensor]]:
    """(CompVis config, state dict) of an ``LDMPipeline``: eps_theta's training weights (no EMA copy, ``use_ema:
    false``), the first stage, tau_theta and the schedule."""
    first_stage = first_stage_params(pipe.vae, in_pipeline=True)
    vae_state = first_stage_state(pipe.vae)
    cond, cond_config, cond_state = cond_stage(pipe, vae_state)
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
        return LDMPipeline.from_pretrained(folder)
    if (folder / "config.json").is_file():
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
    text = yaml.safe_dump(plain(config), sort_keys=False)
    _write_atomically(config_path, lambda tmp: tmp.write_text(text))
    return checkpoint_path, config_path

