"""The stage-1 objective: L_rec + L_perc + lambda * L_adv + L_reg (Esser et al. 2021; Rombach et al. 2022).

Two reductions, each matching the weights it was tuned with:

* ``regularization="kl"`` follows CompVis' ``LPIPSWithDiscriminator``: a learned log-variance
  scales the reconstruction NLL, pixel terms are summed per image and averaged over the batch, and
  the KL term (weight 1e-6) is summed over latent elements the same way.
* ``regularization="vq"`` follows VQGAN's ``VQLPIPSWithDiscriminator``: means everywhere, plus the
  codebook loss and ``beta`` times the commitment loss.

The adversarial term is switched on at ``disc_start`` and weighted by the adaptive weight
lambda = ||grad L_rec|| / (||grad L_GAN|| + 1e-4), both gradients taken at the decoder's last layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .discriminator import DISCRIMINATOR_LOSSES, NLayerDiscriminator, generator_adversarial_loss


def l1_loss(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-element |input - target| (no reduction)."""
    return (input - target).abs()


def l2_loss(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-element (input - target)^2 (no reduction)."""
    return (input - target).pow(2)


PIXEL_LOSSES = {"l1": l1_loss, "l2": l2_loss}


def adaptive_weight(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """lambda = ||d rec_loss / d w|| / (||d gan_loss / d w|| + eps), clamped to [0, max_weight], detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


def discriminator_factor(global_step: int, disc_start: int, factor: float = 1.0) -> float:
    """``factor`` from ``disc_start`` on, 0 before: the delayed start of the adversarial game."""
    return factor if global_step >= disc_start else 0.0


class AutoencoderLoss(nn.Module):
    """Generator and discriminator losses for KL- or VQ-regularised autoencoders.

    Images are [B, C, H, W] in [-1, 1]. Trainable parameters: the discriminator and, for "kl" with
    ``learn_logvar``, the scalar ``logvar`` (which belongs to the autoencoder's optimiser; see
    :meth:`generator_parameters`).
    """

    def __init__(
        self,
        regularization: str = "kl",
        perceptual_loss: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        pixel_loss: str = "l1",
        pixel_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        kl_weight: float = 1e-6,
        codebook_weight: float = 1.0,
        commitment_beta: float = 0.25,
        disc_start: int = 50001,
        disc_factor: float = 1.0,
        disc_weight: float = 0.5,
        disc_loss: str = "hinge",
        learn_logvar: bool = True,
        logvar_init: float = 0.0,
        max_adaptive_weight: float = 1e4,
    ):
        super().__init__()
        if regularization not in ("kl", "vq"):
            raise ValueError(f"regularization must be 'kl' or 'vq', got '{regularization}'.")
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {sorted(PIXEL_LOSSES)}, got '{pixel_loss}'.")
        if disc_loss not in DISCRIMINATOR_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(DISCRIMINATOR_LOSSES)}, got '{disc_loss}'.")
        self.regularization = regularization
        self.perceptual_loss = perceptual_loss
        self.discriminator = discriminator if discriminator is not None else NLayerDiscriminator()
        self.pixel_loss = PIXEL_LOSSES[pixel_loss]
        self.pixel_weight = pixel_weight
        self.perceptual_weight = perceptual_weight
        self.kl_weight = kl_weight
        self.codebook_weight = codebook_weight
        self.commitment_beta = commitment_beta
        self.disc_start = disc_start
        self.disc_factor = disc_factor
        self.disc_weight = disc_weight
        self.disc_loss_kind = disc_loss
        self.disc_loss = DISCRIMINATOR_LOSSES[disc_loss]
        self.max_adaptive_weight = max_adaptive_weight
        use_logvar = regularization == "kl" and learn_logvar
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)), requires_grad=use_logvar)

    def generator_parameters(self) -> list[nn.Parameter]:
        """Loss parameters trained with the autoencoder (the learned log-variance, if any)."""
        return [self.logvar] if self.logvar.requires_grad else []

    def reconstruction_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Per-element pixel loss plus the per-image perceptual distance, [B, C, H, W]."""
        rec = self.pixel_weight * self.pixel_loss(reconstructions, inputs.detach())
        if self.perceptual_loss is not None and self.perceptual_weight > 0:
            p = self.perceptual_loss(reconstructions.float(), inputs.detach().float())
            rec = rec + self.perceptual_weight * p.to(rec.dtype)
        return rec

    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        posterior=None,
        quantizer=None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for the autoencoder's step (logs are detached scalars, synced only when read). ``posterior``: a diffusers DiagonalGaussianDistribution (KL);
        ``quantizer``: a :class:`~ldm_diffusers.models.autoencoders.VQQuantizerOutput` (VQ)."""
        batch = inputs.shape[0]
        rec = self.reconstruction_loss(inputs, reconstructions)
        logs: dict[str, torch.Tensor] = {"rec_loss": rec.detach().mean()}
        if self.regularization == "kl":
            if posterior is None:
                raise ValueError("KL-regularised loss needs the encoder's `posterior`.")
            nll = rec / torch.exp(self.logvar) + self.logvar
            nll_loss = nll.sum() / batch
            kl = posterior.kl().sum() / batch
            loss = nll_loss + self.kl_weight * kl
            logs.update(nll_loss=nll_loss.detach(), kl_loss=kl.detach(), logvar=self.logvar.detach())
        else:
            if quantizer is None:
                raise ValueError("VQ-regularised loss needs the `quantizer` output of LDMVQModel.quantize_latents.")
            nll_loss = rec.mean()
            q_loss = quantizer.codebook_loss + self.commitment_beta * quantizer.commitment_loss
            loss = nll_loss + self.codebook_weight * q_loss
            logs.update(
                nll_loss=nll_loss.detach(),
                codebook_loss=quantizer.codebook_loss.detach(),
                commitment_loss=quantizer.commitment_loss.detach(),
                perplexity=quantizer.perplexity.detach(),
                codebook_usage=quantizer.usage.detach(),
            )

        factor = discriminator_factor(global_step, self.disc_start, self.disc_factor)
        if factor > 0:
            logits_fake = self.discriminator(reconstructions.contiguous())
            g_loss = generator_adversarial_loss(logits_fake, self.disc_loss_kind)
            if self.training and last_layer is not None:
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer, self.max_adaptive_weight)
            else:
                d_weight = torch.ones((), device=inputs.device)
            d_weight = d_weight * self.disc_weight
            loss = loss + d_weight * factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight.detach())
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int, discriminator=None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for the discriminator's step; reconstructions are detached here, so the autoencoder
        gets no gradient from it. Zero (and no forward pass) before ``disc_start``. ``discriminator``
        overrides ``self.discriminator`` for the forward pass (pass the DDP-wrapped one in distributed
        training so its gradients are all-reduced)."""
        factor = discriminator_factor(global_step, self.disc_start, self.disc_factor)
        if factor == 0:
            zero = inputs.new_zeros(())
            return zero, {"disc_loss": zero}
        discriminator = discriminator if discriminator is not None else self.discriminator
        logits_real = discriminator(inputs.contiguous().detach())
        logits_fake = discriminator(reconstructions.contiguous().detach())
        d_loss = factor * self.disc_loss(logits_real, logits_fake)
        return d_loss, {
            "disc_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
