"""Folders in diffusers' own LDM layouts (``LDMTextToImagePipeline``, ``LDMPipeline``, ``LDMSuperResolutionPipeline``:
``vqvae`` / ``bert`` / ``tokenizer`` / ``unet`` / ``scheduler``) as our pipeline's components."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

# diffusers' own LDM repositories (LDMTextToImagePipeline, e.g. CompVis/ldm-text2im-large-256, and the
# unconditional LDMPipeline) name their components differently; map them onto ours.
DIFFUSERS_LDM_NAMES = {"vqvae": "vae", "bert": "text_encoder", "tokenizer": "tokenizer", "unet": "unet",
                       "scheduler": "scheduler"}


def diffusers_ldm_components(folder: Path, index: dict, dtype: torch.dtype, optional: list[str],
                             kwargs: dict | None = None) -> dict:
    """The components (by our names) of a folder in one of diffusers' LDM layouts, loaded with their diffusers and
    transformers classes (weights from safetensors only); components passed in ``kwargs`` replace the saved ones."""
    # components passed by name (ours or diffusers') replace the saved ones, as in DiffusionPipeline.from_pretrained
    names = {**DIFFUSERS_LDM_NAMES, **{c: c for c in ("vae", "text_encoder", *optional)}}
    passed = {names[k]: v for k, v in (kwargs or {}).items() if k in names}
    components = {}
    for name, ours in DIFFUSERS_LDM_NAMES.items():
        if name not in index or index[name][0] is None or ours in passed:
            continue
        library, class_name = index[name]
        if library in ("diffusers", "transformers"):
            module = importlib.import_module(library)
        else:  # a class inside a diffusers pipeline module, such as latent_diffusion.LDMBertModel
            module = importlib.import_module(f"diffusers.pipelines.{library}")
        component_cls = getattr(module, class_name)
        load = {"subfolder": name}
        # weights from safetensors only, for any model class, whatever its slot (not by the slot's name)
        if isinstance(component_cls, type) and issubclass(component_cls, torch.nn.Module):
            load["use_safetensors"] = True
            load["dtype"] = dtype
        components[ours] = component_cls.from_pretrained(folder, **load)
    if index.get("_class_name") == "LDMSuperResolutionPipeline" and "vae" in components:
        # diffusers' super-resolution pipeline decodes its latents as they are, whatever the VQModel's
        # scaling_factor says (CompVis' bsr_sr: scale 1.0); ours divides by it
        components["vae"].register_to_config(scaling_factor=1.0)
    return {**components, **passed}
