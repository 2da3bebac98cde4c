"""Stage-1 losses: reconstruction, perceptual, adversarial (PatchGAN) and the combined objective."""

from .autoencoder_loss import (
    PIXEL_LOSSES,
    AutoencoderLoss,
    adaptive_weight,
    discriminator_factor,
    l1_loss,
    l2_loss,
)
from .discriminator import NLayerDiscriminator, generator_adversarial_loss, hinge_d_loss, vanilla_d_loss
from .perceptual import LPIPS, EfficientNetPerceptualLoss, FeatureDistance, build_perceptual_loss

__all__ = [
    "AutoencoderLoss",
    "EfficientNetPerceptualLoss",
    "FeatureDistance",
    "LPIPS",
    "NLayerDiscriminator",
    "PIXEL_LOSSES",
    "adaptive_weight",
    "build_perceptual_loss",
    "discriminator_factor",
    "generator_adversarial_loss",
    "hinge_d_loss",
    "l1_loss",
    "l2_loss",
    "vanilla_d_loss",
]
