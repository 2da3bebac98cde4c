"""Training: the stage-1 loop and the atomic checkpointing it shares with later stages."""

from .checkpointing import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint

__all__ = ["list_checkpoints", "load_checkpoint", "resolve_checkpoint", "save_checkpoint"]
