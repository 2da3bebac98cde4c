"""Models: the stage-1 autoencoders (and, later, the latent-diffusion UNet)."""

from .autoencoders import (
    KLAutoencoderOutput,
    LDMAutoencoderKL,
    LDMVQModel,
    VQAutoencoderOutput,
    VQQuantizerOutput,
    estimate_scaling_factor,
    load_autoencoder,
)
from .unet import LDMUNet2DConditionModel, LDMUNet2DModel

__all__ = [
    "LDMUNet2DConditionModel",
    "LDMUNet2DModel",
    "KLAutoencoderOutput",
    "LDMAutoencoderKL",
    "LDMVQModel",
    "VQAutoencoderOutput",
    "VQQuantizerOutput",
    "estimate_scaling_factor",
    "load_autoencoder",
]
