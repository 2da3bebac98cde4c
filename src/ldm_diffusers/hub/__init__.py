"""Sharing on the Hugging Face Hub, above the pipeline: the trained autoencoder's card and upload, the
``base_model`` of cards, and a Space that serves the web demo for a pushed model. (``LDMPipeline.push_to_hub``
and downloads use only the pipeline's own card and :mod:`ldm_diffusers.utils.hub_download`.)"""

from .cards import autoencoder_model_card, hub_base_model, push_autoencoder
from .space import check_space_model, push_space, space_files

__all__ = ["autoencoder_model_card", "check_space_model", "hub_base_model", "push_autoencoder", "push_space",
           "space_files"]
