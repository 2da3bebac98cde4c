"""PatchGAN discriminator (Isola et al. 2017) and its adversarial losses, as used by VQGAN/LDM."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class NLayerDiscriminator(ModelMixin, ConfigMixin):
    """PatchGAN: ``n_layers`` stride-2 4x4 convolutions, then two stride-1 ones.

    Input [B, in_channels, H, W] in [-1, 1]; output logits [B, 1, h, w], one per overlapping patch
    (70x70 receptive field for n_layers=3). ``norm``: "batch" (as in VQGAN), "group" or "none".
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"norm must be 'batch', 'group' or 'none', got '{norm}'.")

        def norm_layer(ch):
            if norm == "batch":
                return nn.BatchNorm2d(ch)
            if norm == "group":
                return nn.GroupNorm(min(32, ch // 4), ch)
            return nn.Identity()

        layers = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride=stride, padding=1, bias=norm == "none"),
                norm_layer(base_channels * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.main(sample)


def _init_weights(module: nn.Module) -> None:
    # DCGAN initialisation, as in pix2pix / VQGAN.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[softplus(-D(x))] + E[softplus(D(x_rec))]): the non-saturating GAN's cross-entropy."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """-E[D(x_rec)] for hinge (as VQGAN), E[softplus(-D(x_rec))] for vanilla."""
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


DISCRIMINATOR_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
