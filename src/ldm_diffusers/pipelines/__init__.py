"""Pipelines: sampling from a trained Latent Diffusion Model."""

from .pipeline_ldm import LDMPipeline

__all__ = ["LDMPipeline"]
