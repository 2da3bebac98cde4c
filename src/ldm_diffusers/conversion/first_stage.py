"""The CompVis first stage (``ldm.models.autoencoder.AutoencoderKL`` / ``VQModel``, taming's Encoder/Decoder) as
diffusers' ``AutoencoderKL`` / ``VQModel`` layout.

Written here rather than taken from diffusers' ``convert_ldm_vae_checkpoint``: that one knows Stable Diffusion's
VAE only and silently drops what it does not expect, i.e. the attention blocks *inside* the levels of kl-f16,
kl-f32, vq-f8 and vq-f16 (``attn_resolutions``) and the VQ codebook. Here every key is either mapped or ignored
by name (:data:`IGNORED_PREFIXES`), and anything else is an error.
"""

from __future__ import annotations

import re

import torch

from ..utils.model_files import CheckpointError

# Training-only weights in released first-stage checkpoints (LPIPS, discriminator, KL log-variance).
IGNORED_PREFIXES = ("loss.",)

RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def autoencoder_config(params: dict) -> tuple[str, dict]:
    """(``"kl"`` or ``"vq"``, diffusers constructor keyword arguments) for a CompVis first-stage ``params`` section
    (``ddconfig``, ``embed_dim``, ``n_embed``)."""
    dd = params["ddconfig"]
    kind = "vq" if "n_embed" in params else "kl"
    levels = len(dd["ch_mult"])
    attn_sizes = set(dd.get("attn_resolutions") or [])
    # attn_resolutions are feature-map sides: level i works at resolution / 2**i
    attention = [dd["resolution"] // 2**i in attn_sizes for i in range(levels)]
    if params["embed_dim"] != dd["z_channels"] and kind == "kl":
        raise CheckpointError(f"KL first stage with embed_dim {params['embed_dim']} != z_channels {dd['z_channels']}: "
                              "diffusers' AutoencoderKL has no such layout.")
    config = {
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attention),
        "up_block_types": tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attention)),
        "block_out_channels": tuple(dd["ch"] * m for m in dd["ch_mult"]),
        "layers_per_block": dd["num_res_blocks"],
        "latent_channels": dd["z_channels"],
        "norm_num_groups": 32,
        "sample_size": dd["resolution"],
        "mid_block_add_attention": dd.get("attn_type", "vanilla") != "none",
        "scaling_factor": 1.0,  # autoencoder units; an LDM sets its own scale factor
    }
    if kind == "vq":
        config.update(num_vq_embeddings=params["n_embed"], vq_embed_dim=params["embed_dim"])
    return kind, config


def first_stage_key(key: str, levels: int) -> str | None:
    """The diffusers name of one CompVis first-stage key (without a ``first_stage_model.`` prefix); None for a key
    that is dropped on purpose; raises for a key it does not know."""
    if key.startswith(IGNORED_PREFIXES):
        return None
    if key.startswith(("quant_conv.", "post_quant_conv.")) or key == "quantize.embedding.weight":
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", key)
    if m:
        part, layer, what = m.groups()
        return f"{part}.{'conv_norm_out' if layer == 'norm_out' else layer}.{what}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_[12]|attn_1)\.(\w+)\.(weight|bias)", key)
    if m:
        part, block, layer, what = m.groups()
        if block == "attn_1":
            return f"{part}.mid_block.attentions.0.{ATTENTION_NAMES[layer]}.{what}"
        return f"{part}.mid_block.resnets.{int(block[-1]) - 1}.{RESNET_NAMES[layer]}.{what}"
    m = re.fullmatch(r"(encoder\.down|decoder\.up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m:
        where, level, kind, index, layer, what = m.groups()
        part, blocks, level = ("encoder", "down_blocks", int(level)) if where == "encoder.down" else (
            "decoder", "up_blocks", levels - 1 - int(level))  # CompVis' up.0 is the highest resolution, run last
        names = RESNET_NAMES if kind == "block" else ATTENTION_NAMES
        sub = "resnets" if kind == "block" else "attentions"
        if layer in names:
            return f"{part}.{blocks}.{level}.{sub}.{index}.{names[layer]}.{what}"
    m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", key)
    if m:
        return f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", key)
    if m:
        return f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
    raise CheckpointError(f"Unknown first-stage key '{key}': not part of a CompVis KL / VQ autoencoder.")


def convert_first_stage_state_dict(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """CompVis first-stage weights (keys without prefix) -> diffusers ``AutoencoderKL`` / ``VQModel`` weights.
    AttnBlock's q / k / v / proj_out are 1x1 convolutions there and linear layers here."""
    out = {}
    for key, value in state.items():
        name = first_stage_key(key, levels)
        if name is None:
            continue
        if ".attentions." in name and name.endswith("weight") and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[name] = value
    return out
