"""The latent diffusion objective (the paper's eq. 2 in the stage-1 latent space), on one training batch:

1. z0 = E(x) * scale (the frozen stage-1 encoder's posterior sample, from pixels or the latent cache);
2. the mode's inputs y, dropped to the null input with the condition dropout probability (classifier-free guidance);
3. t ~ U{0..T-1}, eps ~ N(0, I), z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps;
4. loss = ||target - eps_theta(z_t, t, tau_theta(y))||^2 with target eps (or v), optionally min-SNR-gamma weighted.

Every per-example draw (t, eps, the posterior sample, dropout) comes from a generator seeded by (seed, epoch, dataset
index), so a run resumes exactly and a 2-process run sees the draws a 1-process run sees for the same images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from ..conditioning import Conditioning
from ..models.autoencoders import at_least_float32, encode_latent_moments, latent_scaling_factor


def example_generators(seed: int, epoch: int, indices: torch.Tensor):
    """(torch generator, numpy generator) per example, seeded by (seed, epoch, dataset index)."""
    gens = []
    for index in indices.tolist():
        state = np.random.SeedSequence([seed, epoch, index]).generate_state(2)
        gens.append((torch.Generator().manual_seed(int(state[0])), np.random.default_rng(int(state[1]))))
    return gens


def draw_noise(gens, latent_shape, num_train_timesteps: int, dropout: float) -> dict[str, torch.Tensor]:
    """Each example's draws, stacked over the batch: ``t`` [B], ``noise`` eps, ``offset`` [B, c, 1, 1]
    (noise offset), ``perturbation`` (input perturbation), ``posterior`` (the KL posterior's eps), all
    [B, c, h, w] unless noted, and ``drop`` [B] (condition dropout). Always drawn in this order."""
    draws = {"t": [], "noise": [], "offset": [], "perturbation": [], "posterior": [], "drop": []}
    for g, _ in gens:
        draws["t"].append(torch.randint(0, num_train_timesteps, (), generator=g))
        draws["noise"].append(torch.randn(latent_shape, generator=g))
        draws["offset"].append(torch.randn(latent_shape[0], 1, 1, generator=g))
        draws["perturbation"].append(torch.randn(latent_shape, generator=g))
        draws["posterior"].append(torch.randn(latent_shape, generator=g))
        draws["drop"].append(torch.rand((), generator=g) < dropout)
    return {name: torch.stack(values) for name, values in draws.items()}


class DiffusionObjective:
    """The LDM objective on one batch (see the module docstring): ``objective(batch, epoch, denoiser)`` -> loss.

    ``null_context``: the empty prompt's frozen tokens, which condition dropout swaps in for cached tokens."""

    def __init__(self, args, mode, columns, vae, noise_scheduler, weight_dtype: torch.dtype, device,
                 null_context: torch.Tensor | None = None):
        self.args, self.mode, self.columns, self.vae = args, mode, columns, vae
        self.noise_scheduler, self.weight_dtype, self.device = noise_scheduler, weight_dtype, device
        self.scale = latent_scaling_factor(vae)
        self.null_context = null_context

    def latent_moments(self, batch) -> dict[str, torch.Tensor]:
        """The batch's stage-1 encoding, unscaled: from the cache, or the frozen encoder on its pixels."""
        if "latent_mean" in batch or "latents" in batch:
            return {k: batch[k] for k in ("latent_mean", "latent_std", "latents") if k in batch}
        return encode_latent_moments(self.vae, batch["pixel_values"])

    def clean_latents(self, moments: dict, posterior_noise: torch.Tensor) -> torch.Tensor:
        """z0 [B, c, h, w], scaled; a KL posterior is sampled with ``posterior_noise``, as CompVis'
        get_first_stage_encoding."""
        if "latents" in moments:
            return at_least_float32(moments["latents"].to(self.device)) * self.scale
        return (at_least_float32(moments["latent_mean"].to(self.device))
                + at_least_float32(moments["latent_std"].to(self.device)) * posterior_noise) * self.scale

    def __call__(self, batch, epoch: int, denoiser) -> torch.Tensor:
        args, device = self.args, self.device
        gens = example_generators(args.seed, epoch, batch["index"])
        moments = self.latent_moments(batch)
        base = moments.get("latents", moments.get("latent_mean"))
        draws = draw_noise(gens, tuple(base.shape[1:]), self.noise_scheduler.config.num_train_timesteps,
                           args.conditioning_dropout_prob)
        draws = {name: value.to(device, non_blocking=True) for name, value in draws.items()}
        t, drop = draws["t"], draws["drop"]
        z0 = self.clean_latents(moments, draws["posterior"])
        noise = draws["noise"] + args.noise_offset * draws["offset"]
        noisy = self.noise_scheduler.add_noise(z0, noise + args.input_perturbation * draws["perturbation"], t)
        target = noise if args.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(z0, noise, t)

        raw = getattr(denoiser, "module", denoiser)
        conditioning, values = None, None
        if "context" in batch:  # cached frozen text tokens; dropout swaps in the empty prompt's tokens
            context = batch["context"].to(device, self.weight_dtype)
            context = torch.where(drop.view(-1, 1, 1), self.null_context.expand_as(context), context)
            conditioning = Conditioning(context=context)
        else:
            values = self.mode.training_inputs(batch, self.columns, [np_rng for _, np_rng in gens])
            values = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
            values = self.mode.drop(raw.components(), values, drop)
        if self.args.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32):
            pred = denoiser(noisy, t, values, conditioning)
        pred, target = at_least_float32(pred), at_least_float32(target)
        if args.snr_gamma is None:
            return F.mse_loss(pred, target)
        snr = compute_snr(self.noise_scheduler, t)
        weights = torch.clamp(snr, max=args.snr_gamma) / (snr + 1 if args.prediction_type == "v_prediction" else snr)
        per_example = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        return (per_example * weights).mean()
