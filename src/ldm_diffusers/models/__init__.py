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

__all__ = [
    "KLAutoencoderOutput",
    "LDMAutoencoderKL",
    "LDMVQModel",
    "VQAutoencoderOutput",
    "VQQuantizerOutput",
    "estimate_scaling_factor",
    "load_autoencoder",
]
