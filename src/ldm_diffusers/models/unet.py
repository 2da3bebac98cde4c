"""Stage 2 of Latent Diffusion: the time-conditional UNet eps_theta(z_t, t, tau_theta(y)).

``LDMUNet2DConditionModel`` is diffusers' ``UNet2DConditionModel`` (ResBlocks with timestep
embedding; SpatialTransformer blocks whose cross-attention takes Q from the UNet features and K, V
from the conditioning tokens) with a builder for the paper's configurations and input checks:

* cross-attention conditioning: ``context_dim`` = width of tau_theta's tokens;
* concatenation conditioning: ``concat_channels`` extra input channels for spatially aligned inputs
  (``in_channels = latent_channels + concat_channels``; the output keeps ``latent_channels``);
* both at once, or neither (self-attention blocks only, as in the unconditional LDMs).

It adds no modules and no config keys, so its folders load in stock ``UNet2DConditionModel`` too.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import register_to_config

from ..utils.model_cards import CardDetails, ComponentCardMixin
from ..utils.model_files import safe_from_pretrained


def unet_cross_attends(config) -> bool:
    """Whether a diffusers UNet config has cross-attention blocks (UNet2DModel configs never do)."""
    blocks = list(config.get("down_block_types") or []) + [config.get("mid_block_type") or ""]
    return any("CrossAttn" in block for block in blocks)


class LDMUNet2DConditionModel(ComponentCardMixin, UNet2DConditionModel):
    """eps_theta for latents [B, latent_channels, h, w]; see the module docstring."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``, safetensors only, with clear errors for bad folders."""
        return safe_from_pretrained(super(), pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_ldm_config(
        cls,
        latent_channels: int = 4,
        concat_channels: int = 0,
        context_dim: int | None = None,
        base_channels: int = 224,
        channel_multipliers: Iterable[int] = (1, 2, 3, 4),
        attention_levels: Iterable[int] | None = None,
        layers_per_block: int = 2,
        attention_head_dim: int = 32,
        transformer_depth: int = 1,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        **kwargs,
    ) -> "LDMUNet2DConditionModel":
        """Build a UNet the way the paper's configs describe it.

        ``channel_multipliers`` give one resolution level each (widths ``base_channels * m``);
        ``attention_levels`` lists the levels (0 = full latent resolution) that get transformer blocks
        (default: all but the first); ``attention_head_dim`` is the width per head (CompVis
        ``num_head_channels``). With ``context_dim`` those blocks cross-attend to tokens of that width;
        without it they self-attend only. ``concat_channels`` widens the input convolution.
        """
        multipliers = list(channel_multipliers)
        levels = len(multipliers)
        attention_levels = set(range(1, levels) if attention_levels is None else attention_levels)
        if not attention_levels <= set(range(levels)):
            raise ValueError(f"attention_levels {sorted(attention_levels)} must lie in 0..{levels - 1}.")
        cross = context_dim is not None
        attn_down, attn_up = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if cross else ("AttnDownBlock2D", "AttnUpBlock2D")
        down = tuple(attn_down if i in attention_levels else "DownBlock2D" for i in range(levels))
        up = tuple(attn_up if i in attention_levels else "UpBlock2D" for i in reversed(range(levels)))
        widths = tuple(base_channels * m for m in multipliers)
        if any(w % attention_head_dim for w in widths):
            raise ValueError(f"Every block width {widths} must be divisible by attention_head_dim={attention_head_dim}.")
        return cls(
            sample_size=sample_size,
            in_channels=latent_channels + concat_channels,
            out_channels=latent_channels,
            down_block_types=down,
            up_block_types=up,
            mid_block_type="UNetMidBlock2DCrossAttn" if cross else "UNetMidBlock2D",
            block_out_channels=widths,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            cross_attention_dim=context_dim if cross else widths[-1],
            # In UNet2DConditionModel "attention_head_dim" is, for historical reasons, the number of heads
            # of cross-attention blocks but the width per head of self-attention blocks.
            attention_head_dim=tuple(w // attention_head_dim for w in widths) if cross else attention_head_dim,
            transformer_layers_per_block=transformer_depth,
            **kwargs,
        )

    @property
    def latent_channels(self) -> int:
        return self.config.out_channels

    @property
    def concat_channels(self) -> int:
        """Extra input channels for concatenation conditioning (0 if none)."""
        return self.config.in_channels - self.config.out_channels

    @property
    def context_dim(self) -> int | None:
        """Width of the conditioning tokens ``encoder_hidden_states`` the UNet takes, or None when it takes
        none (no cross-attention) or when no single width applies (per-block ``cross_attention_dim`` of
        different widths, or an ``encoder_hid_proj`` that takes something other than tokens)."""
        config = self.config
        if not unet_cross_attends(config):
            return None
        if self.encoder_hid_proj is not None:
            return config.encoder_hid_dim if config.encoder_hid_dim_type in ("text_proj", "text_image_proj") else None
        widths = set(config.cross_attention_dim) if isinstance(config.cross_attention_dim, (list, tuple)) else {
            config.cross_attention_dim}
        return widths.pop() if len(widths) == 1 else None

    def _card_details(self) -> CardDetails:
        """Description, tags, pipeline tag and table rows for this UNet's model card."""
        return (
            f"The denoising UNet eps_theta(z_t, t, context): latents [B, {self.latent_channels}, h, w]"
            + (f" with {self.concat_channels} concatenated conditioning channels" if self.concat_channels else "")
            + f" and a timestep in 0..999 -> predicted noise [B, {self.latent_channels}, h, w].",
            ["unet"], None,  # not runnable on its own: no pipeline tag, so the Hub offers no widget for it
            [("block channels", list(self.config.block_out_channels)), ("cross-attention width", self.context_dim),
             ("concatenated channels", self.concat_channels)],
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """diffusers' ``UNet2DConditionModel.forward`` (same arguments) with input checks first.

        ``sample`` [B, latent_channels + concat_channels, h, w]; ``encoder_hidden_states`` [B, n, context_dim]
        (may be left out for a UNet without cross-attention). Returns eps (or v) [B, latent_channels, h, w]."""
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"The UNet takes [batch, {self.config.in_channels}, h, w] ({self.latent_channels} latent + "
                f"{self.concat_channels} concatenated channels), got {tuple(sample.shape)}."
            )
        takes_tokens = self.encoder_hid_proj is None or self.config.encoder_hid_dim_type != "image_proj"
        if unet_cross_attends(self.config) and takes_tokens:
            if encoder_hidden_states is None:
                raise ValueError("This UNet cross-attends to conditioning tokens: pass encoder_hidden_states.")
            if self.context_dim is not None and encoder_hidden_states.shape[-1] != self.context_dim:
                raise ValueError(
                    f"Conditioning tokens must be {self.context_dim} wide, got {encoder_hidden_states.shape[-1]}."
                )
        return super().forward(
            sample, timestep, encoder_hidden_states, class_labels=class_labels, timestep_cond=timestep_cond,
            attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs,
            added_cond_kwargs=added_cond_kwargs, down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
            down_intrablock_additional_residuals=down_intrablock_additional_residuals,
            encoder_attention_mask=encoder_attention_mask, return_dict=return_dict,
        )


def _with_head_counts(init):
    """``LDMUNet2DModel.__init__``'s signature: ``UNet2DModel``'s parameters plus ``attention_head_counts``, so that
    diffusers' config machinery (which reads the signature) saves and loads every key without repeating the parent's
    list of ~28 parameters here."""
    parent = inspect.signature(UNet2DModel.__init__)
    extra = inspect.Parameter("attention_head_counts", inspect.Parameter.KEYWORD_ONLY, default=None)
    init.__signature__ = parent.replace(parameters=[*parent.parameters.values(), extra])
    return init


class LDMUNet2DModel(ComponentCardMixin, UNet2DModel):
    """diffusers' ``UNet2DModel`` (eps_theta with self-attention blocks only: the unconditional and concatenation-
    conditioned LDMs) plus ``attention_head_counts``: the number of attention heads of each resolution level
    (the mid block takes the last level's), where the parent has one width per head for the whole UNet.

    CompVis' UNets with a fixed ``num_heads`` (inpainting_big, lsun_churches256, semantic synthesis) have a different
    head width at every level; the weights do not depend on the head count, only the attention does. Where every
    level has the same head width the converter uses stock ``UNet2DModel``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``, safetensors only, with clear errors for bad folders."""
        return safe_from_pretrained(super(), pretrained_model_name_or_path, **kwargs)

    @register_to_config
    @_with_head_counts
    def __init__(self, *args, attention_head_counts: tuple[int, ...] | None = None, **kwargs):
        if attention_head_counts is not None:
            kwargs["attention_head_dim"] = None  # the parent builds one head per block; the heads are split below
        super().__init__(*args, **kwargs)
        if attention_head_counts is None:
            return
        widths = self.config.block_out_channels
        if len(attention_head_counts) != len(widths) or any(w % h for w, h in zip(widths, attention_head_counts)):
            raise ValueError(f"attention_head_counts {tuple(attention_head_counts)} must give one head count per "
                             f"level that divides its width {tuple(widths)}.")
        levels = [(block, i) for i, block in enumerate(self.down_blocks)]
        levels += [(block, len(widths) - 1 - u) for u, block in enumerate(self.up_blocks)]
        levels += [(self.mid_block, len(widths) - 1)] if self.mid_block is not None else []
        for block, level in levels:
            for attention in getattr(block, "attentions", None) or []:
                heads = attention_head_counts[level]
                attention.heads = attention.sliceable_head_dim = heads
                attention.scale = (attention.inner_dim // heads) ** -0.5

    def _card_details(self) -> CardDetails:
        """Description, tags, pipeline tag and table rows for this UNet's model card."""
        channels = self.config.out_channels
        return (
            f"The denoising UNet eps_theta(z_t, t) with self-attention blocks: latents [B, {channels}, h, w]"
            + (f" with {self.config.in_channels - channels} concatenated conditioning channels"
               if self.config.in_channels != channels else "")
            + f" and a timestep in 0..999 -> predicted noise [B, {channels}, h, w].",
            ["unet"], None,
            [("block channels", list(self.config.block_out_channels)),
             ("attention heads per level", list(self.config.attention_head_counts or []))],
        )
