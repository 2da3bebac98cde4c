"""Run training loops in processes that are SIGKILLed at chosen moments (for tests/training/test_kill9.py).

Each run is a child forked from a ``forkserver`` that imported torch, diffusers and both training loops once, so a
run starts in well under a second instead of re-importing for ten. A run dies by SIGKILL either at a time after
its start (sent by the parent), or at the n-th file-system operation it makes on one kind of output: the child
watches its own operations with a Python audit hook (``sys.addaudithook``: opening a file for writing, mkdir,
rename, remove, rmtree) and kills itself right there, half-way through writing a checkpoint, the latent cache or
the final model. Nothing inside the training code knows about the test.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PRELOAD = ["torch", "diffusers", "accelerate", "datasets", "ldm_diffusers.training.latent_diffusion",
           "ldm_diffusers.training.autoencoder", "helpers.kill9"]
AUDITED = {"open", "os.mkdir", "os.rename", "os.remove", "shutil.rmtree"}

# What a run is writing, told by the temporary folders and the marker it makes (see utils/model_files.py).
WRITES = {
    "checkpoint": lambda out: list(out.glob(".checkpoint-*.tmp")),
    "latent cache": lambda out: list(out.glob("latent_cache/.*.tmp-*")),
    "final model": lambda out: list(out.glob(".incomplete-save")) + list(out.glob(".pipeline.tmp-*"))
    + list(out.glob(".final.tmp-*")),
}


def kind_of(path: str, out: str) -> str | None:
    """Which output a file-system operation on ``path`` belongs to (None: something else)."""
    if not path.startswith(out + "/"):
        return None
    rel = path[len(out) + 1:]
    if rel.startswith(("checkpoint-", ".checkpoint-")):
        return "checkpoint"
    if rel.startswith("latent_cache/"):
        return "latent cache"
    if rel.startswith((".pipeline.tmp-", ".final.tmp-", ".incomplete-save")):
        return "final model"
    return None


def _writes(event: str, args: tuple) -> bool:
    if event != "open":
        return True
    mode, flags = args[1], args[2]
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def _child(loop: str, argv: list[str], log: str, out: str, during: str | None, nth: int) -> None:
    """Body of a forked run: output to ``log``, one thread (every run, killed or not, computes alike), the kill
    hook, train."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import threading

    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)
    # tqdm's default lock is a multiprocessing one (a named semaphore): a killed child would leak it and the
    # resource tracker would warn at exit. One process, one thread: a thread lock does.
    tqdm.set_lock(threading.RLock())
    if during is not None:
        count = [0]
        out = os.path.realpath(out)

        def hook(event, args):
            if event in AUDITED and args and isinstance(args[0], (str, bytes, os.PathLike)) and _writes(event, args):
                path = os.path.realpath(os.fsdecode(args[0]))
                if kind_of(path, out) == during:
                    count[0] += 1
                    if count[0] == nth:
                        os.kill(os.getpid(), signal.SIGKILL)

        sys.addaudithook(hook)
    if loop == "stage1":
        from ldm_diffusers.training.autoencoder import main
    else:
        from ldm_diffusers.training.latent_diffusion import main
    main(argv)


def context():
    """The forkserver context, with the server started (its imports take seconds that no run should count)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    warm = ctx.Process(target=time.sleep, args=(0,))
    warm.start()
    warm.join()
    return ctx


@dataclass
class Kill:
    """When to kill: ``after`` seconds from the start, or at the ``nth`` file-system write the run makes on one
    kind of output (``during``: "checkpoint", "latent cache" or "final model")."""

    after: float | None = None
    during: str | None = None
    nth: int = 1


@dataclass
class Outcome:
    plan: Kill | None
    killed: bool
    writing: dict[str, list[str]] = field(default_factory=dict)  # kind -> temporary folders that existed at the kill
    exitcode: int | None = None


def run(ctx, loop: str, argv: list[str], out: Path, log: Path, plan: Kill | None, timeout: float = 300) -> Outcome:
    """Start a run and wait for it; it is SIGKILLed as ``plan`` says (None: it runs to the end)."""
    during, nth = (plan.during, plan.nth) if plan is not None else (None, 0)
    before = {str(p) for find in WRITES.values() for p in find(out)} if out.is_dir() else set()
    proc = ctx.Process(target=_child, args=(loop, argv, str(log), str(out), during, nth))
    start = time.monotonic()
    proc.start()
    while proc.is_alive():
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            proc.kill()
            raise TimeoutError(f"{loop} run did not finish in {timeout} s; see {log}")
        if plan is not None and plan.after is not None and elapsed >= plan.after:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.001)
    proc.join()
    writing = {kind: [str(p.relative_to(out)) for p in find(out) if str(p) not in before]
               for kind, find in WRITES.items()}
    return Outcome(plan, proc.exitcode == -signal.SIGKILL, {k: v for k, v in writing.items() if v}, proc.exitcode)


def chaos_plans(rng, duration: float, cache: bool) -> list[Kill]:
    """Eleven kills for a run that takes ``duration`` seconds uninterrupted: while the latent cache is written (if
    any), at writes among the first checkpoints a run makes, at random times early in a run and at writes of the
    final model. In this order, so that each kind finds the run at a point where it can happen (a run that is
    already complete still writes its final model again)."""
    plans = [Kill(during="latent cache", nth=rng.randint(1, 4)) for _ in range(2)] if cache else []
    plans += [Kill(during="checkpoint", nth=rng.randint(1, 6)) for _ in range(4)]
    plans += [Kill(after=rng.uniform(0.1, 0.35) * duration) for _ in range(3)]
    plans += [Kill(during="final model", nth=rng.randint(1, 6)) for _ in range(2 if cache else 4)]
    return plans


def killed_line(outcome: Outcome) -> str:
    plan = outcome.plan
    when = f"after {plan.after:.2f} s" if plan.after is not None else f"{plan.during} write #{plan.nth}"
    folders = [p for paths in outcome.writing.values() for p in paths]
    return f"{when}: killed" + (f" while {', '.join(folders)} existed" if folders else "")
