"""Atomic training checkpoints on top of ``accelerate``'s ``save_state`` / ``load_state``.

A checkpoint is the folder ``<output_dir>/checkpoint-<step>`` holding accelerate's state (models as
safetensors, optimisers, LR schedulers, RNG states, registered objects such as EMA) and
``training_state.json`` (global step, epoch, batches consumed in that epoch). It is written into a
hidden temporary folder and renamed into place, so a crash mid-write never leaves a half checkpoint
that ``--resume_from_checkpoint latest`` would pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path

import torch

from ..utils.model_files import discard_directory, publish_directory, remove_stale_temporaries

STATE_FILE = "training_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := _CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """``"latest"`` -> newest checkpoint in ``output_dir`` (None if there is none); a name or path -> that folder."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume_from_checkpoint
    if not (path / STATE_FILE).is_file():
        available = ", ".join(p.name for p in list_checkpoints(output_dir)) or "none"
        raise FileNotFoundError(
            f"'{resume_from_checkpoint}' is not a complete checkpoint (no {STATE_FILE}). "
            f"Checkpoints in '{output_dir}': {available}. Use --resume_from_checkpoint latest."
        )
    return path


def save_checkpoint(accelerator, output_dir: str | Path, state: dict, total_limit: int | None = None) -> Path | None:
    """Write ``checkpoint-<state['global_step']>`` atomically; keep at most ``total_limit`` checkpoints.

    Call on every process (accelerate gathers what it needs); only the main process writes."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{state['global_step']}"
    # One temporary folder for all processes: accelerate writes each process's RNG state there.
    tmp = output_dir / f".{final.name}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        publish_directory(tmp, final)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                discard_directory(old)
    accelerator.wait_for_everyone()
    return final if accelerator.is_main_process else None


def load_run_checkpoint(accelerator, checkpoint: Path) -> dict:
    """Restore accelerate's state from ``checkpoint`` and return its training_state.json."""
    accelerator.load_state(str(checkpoint))
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


LOG_FILE = "train_log.jsonl"


def resume(accelerator, output_dir: str | Path, resume_from_checkpoint: str | None) -> tuple[int, int, int]:
    """Restore the checkpoint that ``resume_from_checkpoint`` names (``"latest"``, a name or a path), drop
    the lines of ``train_log.jsonl`` that an interrupted run wrote after it (all of them when the run starts
    from scratch), and return (global_step, epoch, batches_in_epoch); (0, 0, 0) when there is nothing to resume."""
    output_dir = Path(output_dir)
    if accelerator.is_main_process:
        for path in remove_stale_temporaries(output_dir):
            accelerator.print(f"Removed {path.name}, left by an interrupted write.")
    checkpoint = resolve_checkpoint(output_dir, resume_from_checkpoint)
    state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0}
    if checkpoint is not None:
        state = load_run_checkpoint(accelerator, checkpoint)
        accelerator.print(f"Resumed from {checkpoint} at step {state['global_step']}.")
    elif resume_from_checkpoint:
        accelerator.print(f"No checkpoint in {output_dir}; starting from scratch.")
    log_file = output_dir / LOG_FILE
    if accelerator.is_main_process and log_file.is_file():
        kept = [line for line in log_file.read_text().splitlines() if _logged_step(line) <= state["global_step"]]
        tmp = log_file.with_name(f".{LOG_FILE}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, log_file)  # a kill while rewriting must not lose the log
    return state["global_step"], state["epoch"], state["batches_in_epoch"]


def _logged_step(line: str) -> float:
    """The step of one train_log.jsonl line; a line cut short by a kill counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return float("inf")


def append_log(output_dir: str | Path, step: int, scalars: dict) -> None:
    """One line ``{"step": step, **scalars}`` of ``train_log.jsonl`` (call on the main process)."""
    with open(Path(output_dir) / LOG_FILE, "a") as handle:
        handle.write(json.dumps({"step": step, **scalars}) + "\n")


class StopRequest:
    """Turns SIGTERM / SIGUSR1 (a scheduler's pre-emption notice, ``timeout``) into a clean stop.

    The loops ask :meth:`should_stop` after each optimiser step; once a signal arrived (on any process) they
    save a checkpoint and finish as if ``--max_train_steps`` had been reached, so the model, its metrics and
    ``--resume_from_checkpoint latest`` all work. Signal handlers can only be set from the main thread;
    elsewhere this never fires.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.requested = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.requested

        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
