"""Trained pipelines that ship inside the package (safetensors, float16), usable offline.

``emoji-text-to-image``: a text-to-image LDM (KL-f4 autoencoder + UNet + jointly trained text transformer)
trained with this package's scripts on the built-in 64x64 emoji dataset; model card in
``model_cards/ldm-emoji-text-to-image.md``. Load it with
``LDMPipeline.from_pretrained("builtin:emoji-text-to-image")`` or ``pretrained_model_path()``.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "builtin:"
MODELS = ("emoji-text-to-image",)
DEFAULT_MODEL = MODELS[0]


def pretrained_model_path(name: str = DEFAULT_MODEL) -> Path:
    """The folder of a built-in pipeline (``name`` with or without the ``builtin:`` prefix)."""
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if name not in MODELS:
        raise ValueError(f"Unknown built-in model '{name}'; built-in models: {', '.join(PREFIX + m for m in MODELS)}.")
    folder = Path(__file__).resolve().parent / name
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"The built-in model's files are missing from '{folder}'; reinstall ldm-diffusers.")
    return folder
