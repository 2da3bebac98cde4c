"""Stage 1 of Latent Diffusion: the perceptual-compression autoencoders E/D.

Both classes subclass diffusers' own autoencoders and add no modules, so a folder saved by
them loads in stock ``AutoencoderKL`` / ``VQModel`` too. What they add:

* a downsampling factor ``f = 2**m`` (m = 0..5) chosen by config (:meth:`from_downsampling_factor`);
* input checks with clear errors (channels, sizes divisible by f);
* VQ-reg with the quantiser inside the decoder, as in the paper: ``encode`` returns pre-quantisation
  latents, ``decode`` quantises; ``forward`` returns the codebook/commitment terms separately;
* the latent scaling factor estimated from data (:func:`estimate_scaling_factor`);
* loading that refuses pickle checkpoints and explains corrupt ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, VQModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.utils import BaseOutput

from ..utils.model_cards import CardDetails, ComponentCardMixin, _fmt
from ..utils.model_files import read_config, safe_from_pretrained

MAX_DOWNSAMPLING_LOG2 = 5


def _block_layout(downsampling_factor: int, base_channels: int, channel_multipliers: Iterable[int] | None):
    """Block types and widths for f = 2**m: diffusers' Encoder downsamples once per block but the last."""
    if downsampling_factor < 1 or downsampling_factor & (downsampling_factor - 1):
        raise ValueError(f"downsampling_factor must be a power of two (1, 2, 4, ..., 32), got {downsampling_factor}.")
    m = downsampling_factor.bit_length() - 1
    if m > MAX_DOWNSAMPLING_LOG2:
        raise ValueError(f"downsampling_factor must be at most {2 ** MAX_DOWNSAMPLING_LOG2}, got {downsampling_factor}.")
    if channel_multipliers is None:
        # CompVis uses ch_mult (1, 2, 4, 4) for f=8; continue the pattern for other factors.
        channel_multipliers = [min(2**i, 4) for i in range(m + 1)]
    channel_multipliers = list(channel_multipliers)
    if len(channel_multipliers) != m + 1:
        raise ValueError(
            f"f={downsampling_factor} needs {m + 1} channel multipliers (one per resolution), got {channel_multipliers}."
        )
    widths = tuple(base_channels * c for c in channel_multipliers)
    return ("DownEncoderBlock2D",) * (m + 1), ("UpDecoderBlock2D",) * (m + 1), widths


def is_vq_config(config) -> bool:
    """Whether an autoencoder config (dict or diffusers FrozenDict) describes a VQ model."""
    return "num_vq_embeddings" in config or "VQ" in (config.get("_class_name") or "")


class _LDMAutoencoderMixin(ComponentCardMixin):
    """Shared checks and helpers; ``self.config`` is the diffusers config of the subclass."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Like diffusers' ``from_pretrained`` but safetensors-only, with clear errors for bad checkpoints."""
        return safe_from_pretrained(super(), pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_downsampling_factor(
        cls,
        downsampling_factor: int = 4,
        latent_channels: int = 3,
        base_channels: int = 128,
        channel_multipliers: Iterable[int] | None = None,
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        sample_size: int = 256,
        scaling_factor: float = 1.0,
        **kwargs,
    ):
        """Build an autoencoder with ``f = downsampling_factor`` (1, 2, 4, 8, 16 or 32): m + 1 resolution
        levels of width ``base_channels * channel_multipliers[i]`` (default multipliers 1, 2, 4, 4, ...).
        ``scaling_factor`` 1.0 means "not estimated yet" (:func:`estimate_scaling_factor`). Other keyword
        arguments go to the constructor (e.g. ``num_vq_embeddings``, ``vq_embed_dim``, ``beta``)."""
        down, up, widths = _block_layout(downsampling_factor, base_channels, channel_multipliers)
        return cls(
            down_block_types=down,
            up_block_types=up,
            block_out_channels=widths,
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            **kwargs,
        )

    def last_layer(self) -> torch.nn.Parameter:
        """The decoder's output convolution weight, where the adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

    @property
    def downsampling_factor(self) -> int:
        """f: the ratio between image and latent side lengths."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(channels, height/f, width/f) of the latent that ``encode`` gives for an image of this size."""
        f = self.downsampling_factor
        return (self.latent_channels_for_diffusion, height // f, width // f)

    def check_image(self, sample: torch.Tensor) -> None:
        """Raise a ValueError that says how to fix an input the encoder can't take."""
        if sample.ndim != 4:
            raise ValueError(f"Expected images shaped [batch, channels, height, width], got shape {tuple(sample.shape)}.")
        channels, height, width = sample.shape[1:]
        if channels != self.config.in_channels:
            raise ValueError(
                f"This autoencoder takes {self.config.in_channels}-channel images but got {channels} channels "
                f"(shape {tuple(sample.shape)}). Convert the images (e.g. PIL `.convert('RGB')`) or build the model "
                f"with in_channels={channels}."
            )
        f = self.downsampling_factor
        if height % f or width % f:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by the downsampling factor f={f}; "
                f"resize or crop to a multiple of {f} (e.g. {height // f * f or f}x{width // f * f or f})."
            )

    def check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels_for_diffusion:
            raise ValueError(
                f"Expected latents shaped [batch, {self.latent_channels_for_diffusion}, h, w], "
                f"got {tuple(latents.shape)}."
            )

    def _card_details(self) -> CardDetails:
        """Description, tags, pipeline tag and table rows for this autoencoder's model card."""
        kind = "vq" if is_vq_config(self.config) else "kl"
        rows = [("downsampling factor f", self.downsampling_factor),
                ("latent channels", self.latent_channels_for_diffusion),
                ("scaling factor", _fmt(latent_scaling_factor(self), 6))]
        if kind == "vq":
            rows.append(("codebook", f"{self.config.num_vq_embeddings} codes"))
        return ((f"A {'VQ' if kind == 'vq' else 'KL'}-regularised first-stage autoencoder: images [B, 3, H, W] in "
                 f"[-1, 1] <-> latents [B, {self.latent_channels_for_diffusion}, H/{self.downsampling_factor}, "
                 f"W/{self.downsampling_factor}]."),
                ["autoencoder", f"{kind}-regularized"], "image-to-image", rows)


class LDMAutoencoderKL(_LDMAutoencoderMixin, AutoencoderKL):
    """KL-regularised autoencoder (diffusers ``AutoencoderKL``) with a configurable factor f.

    ``encode(x)`` takes images [B, 3, H, W] in [-1, 1] with H, W divisible by f and returns the
    diagonal Gaussian posterior over latents [B, latent_channels, H/f, W/f]. The constructor is
    diffusers' own (same config keys and defaults); :meth:`from_downsampling_factor` sets
    ``scaling_factor`` 1.0, meaning "not estimated yet": call :func:`estimate_scaling_factor`.
    """

    @property
    def latent_channels_for_diffusion(self) -> int:
        return self.config.latent_channels

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        self.check_image(x)
        return super().encode(x, return_dict=return_dict)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        self.check_latents(z)
        return super().decode(z, return_dict=return_dict, generator=generator)

    def encode_latents(self, x: torch.Tensor, sample_posterior: bool = True, generator=None) -> torch.Tensor:
        """Unscaled latents z for images x: a posterior sample (as CompVis does) or its mode."""
        posterior = self.encode(x).latent_dist
        return posterior.sample(generator=generator) if sample_posterior else posterior.mode()

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True, generator=None):
        """Encode images [B, C, H, W] in [-1, 1], take the posterior's mode (or, with ``sample_posterior=True``,
        a sample, as training does) and decode: diffusers' ``AutoencoderKL.forward``, same defaults.

        Returns :class:`KLAutoencoderOutput` (``sample`` as in diffusers, plus the ``posterior``
        that the KL term needs); ``return_dict=False`` gives diffusers' ``(sample,)``.
        """
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        dec = self.decode(z).sample
        if not return_dict:
            return (dec,)
        return KLAutoencoderOutput(sample=dec, posterior=posterior)



@dataclass
class KLAutoencoderOutput(DecoderOutput):
    """``sample`` [B, C, H, W] reconstruction; ``posterior`` the diagonal Gaussian q(z|x)."""

    posterior: DiagonalGaussianDistribution | None = None


@dataclass
class VQQuantizerOutput(BaseOutput):
    """Vector quantisation of pre-quantisation latents ``z_e`` [B, D, h, w].

    quantized: straight-through ``z_q`` (forward value = nearest codebook entry, gradient flows to z_e).
    codebook_loss: ``mean ||sg[z_e] - z_q||^2`` (moves the codebook).
    commitment_loss: ``mean ||z_e - sg[z_q]||^2`` (unweighted; the loss multiplies it by beta).
    perplexity: exp(entropy) of the code histogram in this batch (1 .. num_vq_embeddings).
    usage: fraction of the codebook used in this batch (0 .. 1).
    indices: [B, h, w] code ids.

    The defaults exist so that ``VQQuantizerOutput(mapping)`` rebuilds it from a dict, as accelerate's
    mixed-precision output conversion does; the model always sets every field.
    """

    quantized: torch.Tensor | None = None
    codebook_loss: torch.Tensor | None = None
    commitment_loss: torch.Tensor | None = None
    perplexity: torch.Tensor | None = None
    usage: torch.Tensor | None = None
    indices: torch.Tensor | None = None


@dataclass
class VQAutoencoderOutput(DecoderOutput):
    """``sample`` [B, C, H, W] reconstruction in about [-1, 1], pre-quantisation ``latents`` and the
    quantiser's terms (``commit_loss`` as diffusers defines it: codebook + beta * commitment)."""

    latents: torch.Tensor | None = None
    quantizer: VQQuantizerOutput | None = None


class LDMVQModel(_LDMAutoencoderMixin, VQModel):
    """VQ-regularised autoencoder (diffusers ``VQModel``) with the quantiser inside the decoder.

    ``encode(x).latents`` are pre-quantisation latents [B, vq_embed_dim, H/f, W/f]: the diffusion
    model works on them, and ``decode`` quantises before decoding. ``beta`` weighs the commitment
    term (diffusers' legacy quantiser puts it on the codebook term instead; we compute both terms
    ourselves in :meth:`quantize_latents`). The constructor takes diffusers' keys with diffusers' defaults
    plus ``beta``; :meth:`from_downsampling_factor` sets ``scaling_factor`` 1.0 as in CompVis VQ LDMs, and
    :func:`latent_scaling_factor` reads a folder saved without the key as 1.0, never as Stable Diffusion's
    0.18215.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 3,
        sample_size: int = 32,
        num_vq_embeddings: int = 256,
        norm_num_groups: int = 32,
        vq_embed_dim: int | None = None,
        scaling_factor: float = 0.18215,
        norm_type: str = "group",
        mid_block_add_attention: bool = True,
        lookup_from_codebook: bool = False,
        force_upcast: bool = False,
        beta: float = 0.25,
    ):
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=down_block_types,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            latent_channels=latent_channels,
            sample_size=sample_size,
            num_vq_embeddings=num_vq_embeddings,
            norm_num_groups=norm_num_groups,
            vq_embed_dim=vq_embed_dim,
            scaling_factor=scaling_factor,
            norm_type=norm_type,
            mid_block_add_attention=mid_block_add_attention,
            lookup_from_codebook=lookup_from_codebook,
            force_upcast=force_upcast,
        )

    @property
    def latent_channels_for_diffusion(self) -> int:
        return self.config.vq_embed_dim or self.config.latent_channels

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        self.check_image(x)
        return super().encode(x, return_dict=return_dict)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True, shape=None):
        if not (force_not_quantize and self.config.lookup_from_codebook):
            self.check_latents(h)
        return super().decode(h, force_not_quantize=force_not_quantize, return_dict=return_dict, shape=shape)

    def encode_latents(self, x: torch.Tensor, sample_posterior: bool = True, generator=None) -> torch.Tensor:
        """Pre-quantisation latents for images x (the argument names match the KL model's)."""
        return self.encode(x).latents

    def quantize_latents(self, z_e: torch.Tensor) -> VQQuantizerOutput:
        """Nearest-codebook quantisation of z_e [B, D, h, w] with both loss terms kept apart."""
        b, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        codebook = self.quantize.embedding.weight
        indices = torch.cdist(flat.float(), codebook.float()).argmin(dim=1)
        z_q = self.quantize.embedding(indices).view(b, h, w, d).permute(0, 3, 1, 2)
        codebook_loss = F.mse_loss(z_q, z_e.detach())
        commitment_loss = F.mse_loss(z_e, z_q.detach())
        counts = torch.bincount(indices, minlength=codebook.shape[0]).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        usage = (counts > 0).float().mean()
        quantized = z_e + (z_q - z_e).detach()
        return VQQuantizerOutput(
            quantized=quantized,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            perplexity=perplexity,
            usage=usage,
            indices=indices.view(b, h, w),
        )

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        """Encode, quantise and decode images [B, C, H, W] in [-1, 1]."""
        z_e = self.encode(sample).latents
        q = self.quantize_latents(z_e)
        dec = self.decode(q.quantized, force_not_quantize=True).sample
        commit_loss = q.codebook_loss + self.config.beta * q.commitment_loss
        if not return_dict:
            return dec, commit_loss
        return VQAutoencoderOutput(sample=dec, commit_loss=commit_loss, latents=z_e, quantizer=q)


@torch.no_grad()
def estimate_scaling_factor(
    autoencoder: LDMAutoencoderKL | LDMVQModel,
    images: Iterable[torch.Tensor],
    max_images: int = 1024,
    update_config: bool = True,
) -> float:
    """Estimate ``1 / std`` of the latents over a sample of the training set and store it in the config.

    ``images`` yields batches [B, C, H, W] in [-1, 1] (e.g. a DataLoader of ``pixel_values``). KL models
    use posterior samples, VQ models pre-quantisation latents, as the diffusion model will see them.
    """
    device = next(autoencoder.parameters()).device
    dtype = next(autoencoder.parameters()).dtype
    was_training = autoencoder.training
    autoencoder.eval()
    total, total_sq, count = 0.0, 0.0, 0
    seen = 0
    for batch in images:
        if isinstance(batch, dict):
            batch = batch["pixel_values"]
        batch = batch[: max_images - seen].to(device=device, dtype=dtype)
        z = autoencoder.encode_latents(batch).double()
        total += z.sum().item()
        total_sq += (z**2).sum().item()
        count += z.numel()
        seen += batch.shape[0]
        if seen >= max_images:
            break
    autoencoder.train(was_training)
    if count == 0:
        raise ValueError("estimate_scaling_factor got no images: the iterable was empty.")
    mean = total / count
    std = max(total_sq / count - mean**2, 0.0) ** 0.5
    if not std > 0 or not torch.isfinite(torch.tensor(std)):
        raise ValueError(f"Latent standard deviation is {std}; cannot estimate a scaling factor.")
    factor = 1.0 / std
    if update_config:
        autoencoder.register_to_config(scaling_factor=factor)
    return factor


def latent_scaling_factor(autoencoder) -> float:
    """The factor that maps the autoencoder's latents to unit variance for the diffusion model.

    A VQ model whose config never set ``scaling_factor`` (CompVis-era folders, or a stock
    ``VQModel`` built with defaults) gets 1.0, as CompVis VQ LDMs use, not diffusers' default 0.18215,
    which is Stable Diffusion's KL value.
    """
    config = autoencoder.config
    if is_vq_config(config) and "scaling_factor" in (config.get("_use_default_values") or []):
        return 1.0
    return float(config.scaling_factor)


def load_autoencoder(path: str | os.PathLike, **kwargs) -> LDMAutoencoderKL | LDMVQModel:
    """Load a saved KL or VQ autoencoder folder, picking the class from its config."""

    config = read_config(path, subfolder=kwargs.get("subfolder"))
    cls = LDMVQModel if is_vq_config(config) else LDMAutoencoderKL
    return cls.from_pretrained(path, **kwargs)


__all__ = [
    "LDMAutoencoderKL",
    "LDMVQModel",
    "KLAutoencoderOutput",
    "VQQuantizerOutput",
    "VQAutoencoderOutput",
    "DecoderOutput",
    "DiagonalGaussianDistribution",
    "estimate_scaling_factor",
    "is_vq_config",
    "latent_scaling_factor",
    "load_autoencoder",
]


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32, or float64 if it is that already (half-precision results are upcast, a float64
    run stays float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


@torch.no_grad()
def encode_latent_moments(vae, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """KL: {"latent_mean", "latent_std"}; VQ: {"latents"} (pre-quantisation), all [B, c, h, w] unscaled."""
    out = vae.encode(pixel_values.to(vae.device, vae.dtype))
    if hasattr(out, "latent_dist"):
        return {"latent_mean": at_least_float32(out.latent_dist.mean), "latent_std": at_least_float32(out.latent_dist.std)}
    return {"latents": at_least_float32(out.latents)}
