"""What the two training stages share: the accelerator, the speed switches, the data loader, the
optimiser's implementation and the loop over optimisation steps (epochs, exact resume, progress bar,
checkpoints, stop signals).

A stage's ``train()`` reads as: build -> data -> ``for batch in loop.batches(): <one optimisation
step>; loop.step_done(); <logging, EMA>; loop.checkpoint_if_due(); <validation>`` -> save.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from torch.optim.optimizer import _get_fused_kernels_supported_devices
from tqdm.auto import tqdm

from .run_checkpoints import StopRequest, resume, save_checkpoint

logger = logging.getLogger(__name__)

ADAM_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")


def make_accelerator(args, output_dir: Path, logging_dir: str):
    """``Accelerator`` with the run's accumulation, precision, trackers and a seedable sampler; seeds
    every RNG with ``args.seed`` and sets up logging."""

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    set_cpu_threads(accelerator, getattr(args, "num_cpu_threads", None))
    set_seed(args.seed)
    return accelerator


def set_cpu_threads(accelerator, requested: int | None) -> None:
    """torch's intra-op threads on a CPU: ``requested``, or (None) the cores this process's share of the machine has
    where ``accelerate launch`` left it one thread: without ``--cpu`` it sets OMP_NUM_THREADS=1 for every process,
    which leaves the other cores of a one-process CPU run idle. Plain ``python`` runs and explicit
    ``--num_cpu_threads`` are left as asked."""
    if accelerator.device.type != "cpu":
        return
    if requested is None:
        launched = "ACCELERATE_MIXED_PRECISION" in os.environ  # set by accelerate launch for every process
        share = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
        if not (launched and torch.get_num_threads() == 1 and share > 1):
            return
        requested = share
    if torch.get_num_threads() != requested:
        logger.info("CPU threads per process: %d (of %d cores).", requested, os.cpu_count() or 1)
        torch.set_num_threads(requested)


def init_trackers(accelerator, args, output_dir: Path, project: str) -> None:
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if args.report_to != "none":
            config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers(project, config=config)


def data_loader(dataset, args, collate_fn, device: torch.device, shuffle: bool = True):
    """The training ``DataLoader``: static batch shapes (the last short batch is dropped when there is more than
    one batch: a compiled step never sees a new shape), workers that stay alive across epochs and load ahead,
    pinned memory for a GPU."""
    workers = args.dataloader_num_workers
    extra = {}
    if workers:
        extra = {"persistent_workers": True, "prefetch_factor": args.dataloader_prefetch_factor or 2}
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=shuffle, collate_fn=collate_fn, num_workers=workers,
        drop_last=len(dataset) >= args.train_batch_size, pin_memory=device.type == "cuda",
        # A private generator: creating a DataLoader iterator draws a seed from it, and drawing from the
        # global RNG instead would shift the random stream on resume (the RNG state is checkpointed).
        generator=torch.Generator().manual_seed(args.seed), **extra,
    )


def adam_kwargs(implementation: str, params: list[torch.Tensor]) -> dict:
    """Keyword arguments that select torch's Adam/AdamW kernel for ``params`` (all on one device)."""
    if implementation == "for-loop":
        return {"foreach": False}
    if implementation == "foreach":
        return {"foreach": True}

    device = params[0].device.type if params else "cpu"
    supported = device in _get_fused_kernels_supported_devices() and all(p.is_floating_point() for p in params)
    if implementation == "fused" and not supported:
        raise SystemExit(f"--adam_implementation fused: torch {torch.__version__} has no fused Adam for "
                         f"{device} parameters; use 'foreach'.")
    return {"fused": True} if supported else {"foreach": True}


def lr_scale(args, accelerator) -> int:
    """``--scale_lr``: the learning rate's factor, batch x accumulation x processes (else 1)."""
    return args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes if args.scale_lr else 1


def lr_schedule(args, accelerator, optimizer, batches_per_epoch: int):
    """diffusers' ``--lr_scheduler`` over the run's optimisation steps; sets ``args.max_train_steps`` from
    ``--num_train_epochs`` (``batches_per_epoch``: the loader's batches per process)."""

    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps / accelerator.num_processes)
    if args.num_train_epochs:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    return get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )


def compile_module(module: nn.Module, frozen: bool = False, fullgraph: bool = True) -> None:
    """``module.compile()`` in place (its state-dict keys, hence checkpoints and EMA, stay the same) with static
    shapes; a ``frozen`` module (no gradients, weights never change) also gets inductor's freezing, which folds
    its weights into the graph and lets oneDNN pre-pack them on a CPU."""
    options = {"freezing": True} if frozen else None
    module.compile(fullgraph=fullgraph, dynamic=False, options=options)


def to_channels_last(*modules: nn.Module | None) -> None:
    for module in modules:
        if module is not None:
            module.to(memory_format=torch.channels_last)


class TrainingLoop:
    """Epochs over ``train_dl`` until ``args.max_train_steps`` optimisation steps.

    Resumes at the checkpoint's (step, epoch, batch in epoch), so a resumed run sees exactly the batches the
    uninterrupted one would have; shows a progress bar; saves a checkpoint every ``args.checkpointing_steps``,
    at the last step and when a stop signal arrives (:class:`StopRequest`), then ends.

    ``streaming``: ``train_dl`` is an endless ``data.streaming.StreamingLoader`` whose position is checkpointed with
    the accelerate state: it is neither re-epoched nor skipped here, and each batch carries its own epoch."""

    def __init__(self, accelerator, args, output_dir: Path, train_dl, desc: str, streaming: bool = False):
        self.accelerator, self.args, self.output_dir, self.train_dl = accelerator, args, output_dir, train_dl
        self.streaming = streaming
        self.global_step, self.epoch, self._resume_batches = resume(accelerator, output_dir, args.resume_from_checkpoint)
        self.batches_in_epoch = 0
        self.stop = StopRequest()
        self.stopping = False
        self.progress = tqdm(total=args.max_train_steps, initial=self.global_step, desc=desc,
                             disable=not accelerator.is_local_main_process)

    @property
    def done(self) -> bool:
        return self.global_step >= self.args.max_train_steps or self.stopping

    def batches(self, on_epoch_end=None):
        """Training batches until done; ``on_epoch_end(epoch)`` after each completed epoch (not when streaming)."""
        if self.streaming:
            for batch in self.train_dl:
                self.epoch, self.batches_in_epoch = self.train_dl.epoch, self.train_dl.batches_taken
                yield batch
                if self.done:
                    return
            return
        first_epoch = self.epoch
        while not self.done:
            self.train_dl.set_epoch(self.epoch)
            loader, self.batches_in_epoch = self.train_dl, 0
            if self.epoch == first_epoch and self._resume_batches:
                loader = self.accelerator.skip_first_batches(self.train_dl, self._resume_batches)
                self.batches_in_epoch = self._resume_batches
            for batch in loader:
                self.batches_in_epoch += 1
                yield batch
                if self.done:
                    return
            self.epoch += 1
            if on_epoch_end is not None:
                on_epoch_end(self.epoch)

    def step_done(self) -> None:
        """Count an optimisation step (call when ``accelerator.sync_gradients``)."""
        self.global_step += 1
        self.progress.update(1)

    def checkpoint_if_due(self) -> None:
        """Save when the step is a checkpointing step, the last one, or a stop signal arrived (then end)."""
        self.stopping = self.stop.should_stop(self.accelerator)
        if self.stopping:
            logger.warning("Stop signal received: saving a checkpoint at step %d and finishing.", self.global_step)
        step = self.global_step
        if step % self.args.checkpointing_steps == 0 or step == self.args.max_train_steps or self.stopping:
            save_checkpoint(self.accelerator, self.output_dir,
                            {"global_step": step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch},
                            self.args.checkpoints_total_limit)

    def close(self) -> None:
        self.progress.close()


class Throughput:
    """Images per second of wall time (data loading, logging and checkpoints included): over the window since
    the last :meth:`read`, and over the run, where the first step (which holds ``--compile``'s compilation) is
    also reported apart."""

    def __init__(self):
        self.start = self.window_start = time.perf_counter()
        self.images = self.window_images = 0
        self.first_step_seconds = None
        self._after_first = None

    def add(self, images: int) -> None:
        now = time.perf_counter()
        if self.first_step_seconds is None:
            self.first_step_seconds, self._after_first = now - self.start, (now, self.images + images)
        self.images += images
        self.window_images += images

    def read(self) -> dict:
        now = time.perf_counter()
        rate = self.window_images / max(now - self.window_start, 1e-9)
        self.window_start, self.window_images = now, 0
        return {"images_per_s": rate}

    def summary(self) -> dict:
        elapsed = time.perf_counter() - self.start
        out = {"seconds": elapsed, "images_per_s": self.images / max(elapsed, 1e-9),
               "first_step_seconds": self.first_step_seconds}
        if self._after_first is not None and self.images > self._after_first[1]:
            since, seen = self._after_first
            out["images_per_s_after_first_step"] = (self.images - seen) / max(time.perf_counter() - since, 1e-9)
        return out
