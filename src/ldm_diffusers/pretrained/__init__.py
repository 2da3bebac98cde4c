"""Trained pipelines that ship inside the package (safetensors, float16), usable offline.

* ``emoji-text-to-image``: a text-to-image LDM (KL-f4 autoencoder + UNet + jointly trained text transformer);
* ``emoji-super-resolution``: 16x16 -> 64x64 (the low-resolution image concatenated to z_t);

both trained with this package's scripts on the built-in 64x64 emoji dataset, on a CPU; model cards in
``model_cards/``. Models of the other modes take the shared KL-f4 autoencoder ``emoji-kl-f4``, stored once: their
folders have no ``vae/``, and :func:`pretrained_components` names the shared one. Load them with
``LDMPipeline.from_pretrained("builtin:emoji-super-resolution")`` etc.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "builtin:"
MODELS = ("emoji-text-to-image", "emoji-super-resolution")
DEFAULT_MODEL = MODELS[0]
SHARED_AUTOENCODER = "emoji-kl-f4"


def pretrained_root() -> Path:
    """The folder holding the built-in models."""
    return Path(__file__).resolve().parent


def pretrained_model_path(name: str = DEFAULT_MODEL) -> Path:
    """The folder of a built-in pipeline (``name`` with or without the ``builtin:`` prefix)."""
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if name not in MODELS:
        raise ValueError(f"Unknown built-in model '{name}'; built-in models: {', '.join(PREFIX + m for m in MODELS)}.")
    folder = pretrained_root() / name
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"The built-in model's files are missing from '{folder}'; reinstall ldm-diffusers.")
    return folder


def pretrained_components(folder: Path) -> dict[str, Path]:
    """Components a built-in pipeline folder takes from elsewhere: ``{"vae": <shared autoencoder folder>}`` where
    the folder has no ``vae/`` of its own, else nothing."""
    if (folder / "vae").is_dir() or folder.parent != pretrained_root():
        return {}
    return {"vae": pretrained_root() / SHARED_AUTOENCODER}
