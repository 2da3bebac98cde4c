"""Training: the stage-1 loop and the atomic checkpointing it shares with later stages."""

from .run_checkpoints import (
    append_log,
    list_checkpoints,
    load_run_checkpoint,
    resolve_checkpoint,
    resume,
    save_checkpoint,
)

__all__ = ["append_log", "list_checkpoints", "load_run_checkpoint", "resolve_checkpoint", "resume", "save_checkpoint"]
