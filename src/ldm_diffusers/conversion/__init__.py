"""Converting the CompVis latent-diffusion checkpoints (the paper's released models) to this package, and back."""

from .ckpt_loader import CheckpointError, Placeholder, UnsafeCheckpointError, load_compvis_ckpt, state_dict_of
from .compvis import convert_compvis_checkpoint, read_compvis_config
from .export import export_compvis_checkpoint

__all__ = ["CheckpointError", "Placeholder", "UnsafeCheckpointError", "convert_compvis_checkpoint",
           "export_compvis_checkpoint", "load_compvis_ckpt", "read_compvis_config", "state_dict_of"]
