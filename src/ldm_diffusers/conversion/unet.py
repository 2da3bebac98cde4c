"""The CompVis eps_theta (``ldm.modules.diffusionmodules.openaimodel.UNetModel``) as a diffusers UNet.

UNets with SpatialTransformer blocks (cross-attention) become ``LDMUNet2DConditionModel``; UNets with plain
AttentionBlocks become diffusers' ``UNet2DModel``, the class diffusers' own CompVis LDM repositories use (its
attention blocks are the same single-head-dim self-attention; ``UNet2DConditionModel`` has no mid block with
self-attention only). The key map is built from the config, block by block, so that every key of the checkpoint is
placed or reported.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from ..models.unet import LDMUNet2DConditionModel, LDMUNet2DModel
from ..utils.model_files import CheckpointError

RESBLOCK_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
             "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _attention_levels(p: dict) -> list[bool]:
    """Level i works at downsampling factor 2**i; CompVis' attention_resolutions lists factors."""
    factors = set(p.get("attention_resolutions") or [])
    return [2**i in factors for i in range(len(p["channel_mult"]))]


def attention_heads(p: dict, width: int) -> int:
    """Attention heads of a block of ``width`` channels, as openaimodel.py computes them."""
    if p.get("num_head_channels", -1) != -1:
        return width // p["num_head_channels"]
    return p["num_heads"]


def unet_config(p: dict) -> tuple[type, dict]:
    """(class, constructor kwargs) of the diffusers UNet for a CompVis ``unet_config.params`` section:
    ``LDMUNet2DConditionModel`` with SpatialTransformers, else ``UNet2DModel`` (``LDMUNet2DModel`` where the head width
    differs between levels)."""


    widths = [p["model_channels"] * m for m in p["channel_mult"]]
    attention = _attention_levels(p)
    common = dict(in_channels=p["in_channels"], out_channels=p["out_channels"], block_out_channels=tuple(widths),
                  layers_per_block=p["num_res_blocks"], norm_num_groups=32, norm_eps=1e-5,
                  flip_sin_to_cos=True, freq_shift=0, sample_size=p.get("image_size", 32), dropout=p.get("dropout", 0.0))
    if p.get("use_spatial_transformer"):
        if p.get("resblock_updown") or p.get("use_scale_shift_norm"):
            raise NotImplementedError("resblock_updown / use_scale_shift_norm in a UNet with SpatialTransformers: no "
                                      "released CompVis model has them, and they are not converted.")
        return LDMUNet2DConditionModel, dict(
            common,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=p["context_dim"],
            # UNet2DConditionModel's attention_head_dim is the number of heads per block (the mid block uses the last)
            attention_head_dim=tuple(attention_heads(p, w) for w in widths),
            transformer_layers_per_block=p.get("transformer_depth", 1),
        )
    resnet = bool(p.get("resblock_updown"))  # down/up-sampling by ResBlocks (avg-pool / nearest inside)
    common.update(resnet_time_scale_shift="scale_shift" if p.get("use_scale_shift_norm") else "default",
                  downsample_type="resnet" if resnet else "conv", upsample_type="resnet" if resnet else "conv",
                  attn_norm_num_groups=32)  # diffusers drops the mid attention's norm for scale_shift unless given
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if resnet else ("DownBlock2D", "UpBlock2D")
    common.update(down_block_types=tuple("AttnDownBlock2D" if a else plain_down for a in attention),
                  up_block_types=tuple("AttnUpBlock2D" if a else plain_up for a in reversed(attention)))
    heads = tuple(attention_heads(p, w) for w in widths)
    head_dims = {w // h for w, h, a in zip(widths, heads, attention) if a} | {widths[-1] // heads[-1]}
    if len(head_dims) == 1:  # one head width everywhere: stock UNet2DModel, as diffusers' CompVis repositories
        return UNet2DModel, dict(common, attention_head_dim=head_dims.pop())
    return LDMUNet2DModel, dict(common, attention_head_counts=heads)


def block_map(p: dict) -> dict[str, tuple[str, str]]:
    """CompVis block prefix -> (diffusers prefix, kind): kind "res" (ResBlock), "attn" (AttentionBlock),
    "transformer" (SpatialTransformer, same names in diffusers) or "layer" (a plain conv / linear / norm)."""
    levels, n = len(p["channel_mult"]), p["num_res_blocks"]
    attention, resnet = _attention_levels(p), bool(p.get("resblock_updown"))
    attn_kind = "transformer" if p.get("use_spatial_transformer") else "attn"
    m = {"time_embed.0": ("time_embedding.linear_1", "layer"), "time_embed.2": ("time_embedding.linear_2", "layer"),
         "input_blocks.0.0": ("conv_in", "layer"), "out.0": ("conv_norm_out", "layer"), "out.2": ("conv_out", "layer"),
         "middle_block.0": ("mid_block.resnets.0", "res"), "middle_block.1": ("mid_block.attentions.0", attn_kind),
         "middle_block.2": ("mid_block.resnets.1", "res")}
    for i in range(levels):
        for j in range(n):
            k = 1 + i * (n + 1) + j
            m[f"input_blocks.{k}.0"] = (f"down_blocks.{i}.resnets.{j}", "res")
            if attention[i]:
                m[f"input_blocks.{k}.1"] = (f"down_blocks.{i}.attentions.{j}", attn_kind)
        if i < levels - 1 and resnet:
            m[f"input_blocks.{1 + i * (n + 1) + n}.0"] = (f"down_blocks.{i}.downsamplers.0", "res")
        elif i < levels - 1:
            m[f"input_blocks.{1 + i * (n + 1) + n}.0.op"] = (f"down_blocks.{i}.downsamplers.0.conv", "layer")
    for u in range(levels):  # diffusers' up_blocks.u is CompVis level levels - 1 - u
        level = levels - 1 - u
        for j in range(n + 1):
            k = u * (n + 1) + j
            m[f"output_blocks.{k}.0"] = (f"up_blocks.{u}.resnets.{j}", "res")
            if attention[level]:
                m[f"output_blocks.{k}.1"] = (f"up_blocks.{u}.attentions.{j}", attn_kind)
            if j == n and u < levels - 1:
                index = 2 if attention[level] else 1
                if resnet:
                    m[f"output_blocks.{k}.{index}"] = (f"up_blocks.{u}.upsamplers.0", "res")
                else:
                    m[f"output_blocks.{k}.{index}.conv"] = (f"up_blocks.{u}.upsamplers.0.conv", "layer")
    return m


def convert_unet_state_dict(state: dict[str, torch.Tensor], p: dict) -> dict[str, torch.Tensor]:
    """CompVis UNet weights (keys relative to ``diffusion_model.``) -> diffusers UNet weights."""
    blocks = block_map(p)
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in blocks:
                break
        else:
            raise CheckpointError(f"Unknown UNet key 'diffusion_model.{key}' for this config.")
        target, kind = blocks[prefix]
        leaf = ".".join(parts[cut:])
        if kind == "res":
            layer, what = leaf.rsplit(".", 1)
            if layer not in RESBLOCK_NAMES:
                raise CheckpointError(f"Unknown ResBlock key 'diffusion_model.{key}'.")
            out[f"{target}.{RESBLOCK_NAMES[layer]}.{what}"] = value
        elif kind == "attn":
            out.update(_attention_block(target, leaf, value, p, key))
        else:  # "layer" and "transformer": diffusers uses CompVis' own names below the prefix
            out[f"{target}.{leaf}"] = value
    return out


def _attention_block(target: str, leaf: str, value: torch.Tensor, p: dict, key: str) -> dict[str, torch.Tensor]:
    """AttentionBlock (QKVAttentionLegacy) -> diffusers Attention. Its ``qkv`` Conv1d(C, 3C) groups the output
    channels per head as [q_h, k_h, v_h] (not [q, k, v]); its 1x1 Conv1d weights become linear ones."""
    layer, what = leaf.rsplit(".", 1)
    if layer == "norm":
        return {f"{target}.group_norm.{what}": value}
    if layer == "proj_out":
        return {f"{target}.to_out.0.{what}": value[..., 0] if value.ndim == 3 else value}
    if layer != "qkv":
        raise CheckpointError(f"Unknown AttentionBlock key 'diffusion_model.{key}'.")
    channels = value.shape[0] // 3
    heads = attention_heads(p, channels)
    grouped = value.reshape(heads, 3, channels // heads, *value.shape[1:])
    q, k, v = (grouped[:, i].reshape(channels, *value.shape[1:]) for i in range(3))
    squeeze = (lambda t: t[..., 0]) if value.ndim == 3 else (lambda t: t)
    return {f"{target}.to_q.{what}": squeeze(q), f"{target}.to_k.{what}": squeeze(k), f"{target}.to_v.{what}": squeeze(v)}
