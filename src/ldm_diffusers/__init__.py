"""ldm-diffusers: Latent Diffusion Models (Rombach et al. 2022) on top of Hugging Face diffusers."""

__version__ = "0.1.0"

# diffusers' loaders look up base classes such as ModelMixin on the component's library module
# (``getattr(library, "ModelMixin")``), so the top-level package exposes them.
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin, SchedulerMixin

from .models import (
    KLAutoencoderOutput,
    LDMAutoencoderKL,
    LDMUNet2DConditionModel,
    LDMUNet2DModel,
    LDMVQModel,
    VQAutoencoderOutput,
    VQQuantizerOutput,
    estimate_scaling_factor,
    load_autoencoder,
)
from .conditioning import ClassEmbedder, LayoutBERTEncoder, LayoutEncoder, SpatialRescaler
from .conversion import convert_compvis_checkpoint, export_compvis_checkpoint
from .pipelines import LDMPipeline
from .schedulers import CompVisDDIMScheduler, ldm_scheduler, switch_sampler

__all__ = [
    "ClassEmbedder",
    "CompVisDDIMScheduler",
    "LDMPipeline",
    "LayoutBERTEncoder",
    "LayoutEncoder",
    "SpatialRescaler",
    "LDMUNet2DConditionModel",
    "LDMUNet2DModel",
    "ldm_scheduler",
    "switch_sampler",
    "convert_compvis_checkpoint",
    "export_compvis_checkpoint",
    "KLAutoencoderOutput",
    "ConfigMixin",
    "DiffusionPipeline",
    "LDMAutoencoderKL",
    "LDMVQModel",
    "ModelMixin",
    "SchedulerMixin",
    "VQAutoencoderOutput",
    "VQQuantizerOutput",
    "estimate_scaling_factor",
    "load_autoencoder",
]
