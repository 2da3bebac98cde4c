"""Stage-2 training: the latent diffusion model eps_theta(z_t, t, tau_theta(y)) for every conditioning mode.

Run through ``examples/train_text_to_image.py`` (``accelerate launch`` or plain ``python``) or
``ldm-diffusers train``. Flags follow diffusers' ``examples/text_to_image/train_text_to_image.py``
where it has one. Each step:

1. z0 = E(x) * scale (from pixels with the frozen stage-1 encoder, or from the latent cache);
2. the mode's inputs y from the batch, dropped to the null input with probability
   ``--conditioning_dropout_prob`` (classifier-free guidance);
3. t ~ U{0..T-1}, eps ~ N(0, I), z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps;
4. loss = ||target - eps_theta(z_t, t, tau_theta(y))||^2 with target eps (or v), optionally
   min-SNR-gamma weighted; tau_theta is trained with the UNet when it has weights of its own.

All per-example randomness (t, eps, the posterior sample, dropout, inpainting masks) comes from a
generator seeded by (seed, epoch, dataset index), so a run resumes exactly and a 2-process run sees the
same draws for the same images as a 1-process run with the same global batch.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from ..conditioning import Conditioning, component_names, mode_named
from ..data.streaming import StreamCheckpoint, streaming_loader
from ..data.transforms import collate_examples
from ..hub import hub_base_model
from ..losses.diffusion import DiffusionObjective
from ..models.autoencoders import load_autoencoder
from ..models.unet import LDMUNet2DConditionModel
from ..pipelines import LDMPipeline
from ..schedulers import ldm_scheduler
from ..utils.attention import require_xformers
from ..utils.model_files import atomic_directory, publish_into
from .distributed import ShardedTraining
from .latent_diffusion_args import parse_args
from .latent_diffusion_data import load_splits, load_stream, set_up_columns, training_rows
from .loop import (
    Throughput,
    TrainingLoop,
    adam_kwargs,
    compile_module,
    data_loader,
    init_trackers,
    lr_scale,
    lr_schedule,
    make_accelerator,
    to_channels_last,
)
from .run_checkpoints import append_log
from .sample_evaluation import SampleEvaluation, ValidationSet

logger = logging.getLogger(__name__)

# -- models -----------------------------------------------------------------------------------------
class Denoiser(nn.Module):
    """eps_theta(z_t, t, tau_theta(y)) as one module: the UNet plus the conditioning encoder that trains with
    it, so that accelerate wraps (DDP/FSDP), synchronises and checkpoints them together. Frozen parts (the
    stage-1 model, a pretrained text encoder) are kept outside the module's parameters."""

    def __init__(self, unet, mode, trainable: dict[str, nn.Module], frozen: dict):
        super().__init__()
        self.unet = unet
        self.mode = mode
        self.encoders = nn.ModuleDict(trainable)
        for module in trainable.values():  # weights the forward never uses (a BERT pooler): no gradient to wait for
            if getattr(module, "pooler", None) is not None:
                module.pooler.requires_grad_(False)
        self._frozen = frozen  # a plain dict: not parameters, not in checkpoints

    def components(self) -> SimpleNamespace:
        """The pipeline-like view the conditioning modes read."""
        parts = dict.fromkeys(component_names())
        parts.update(self._frozen)
        parts.update(dict(self.encoders.items()))
        return SimpleNamespace(unet=self.unet, _execution_device=next(self.unet.parameters()).device, **parts)

    def forward(self, noisy_latents, timesteps, values: dict | None = None, conditioning: Conditioning | None = None):
        """``values``: the mode's inputs (encoded here, with gradients into trainable encoders); or a
        ready ``conditioning`` (cached or frozen tokens). Returns the prediction [B, c, h, w]."""
        if conditioning is None:
            # without a trained encoder (frozen text encoder, stage-1 encodings, plain tensors) no gradient flows into
            # the conditioning: encode it without recording a graph
            with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.encoders)):
                conditioning = self.mode.condition(self.components(), values, tuple(noisy_latents.shape[-2:]))
        model_input = conditioning.model_input(noisy_latents)
        return self.unet(model_input, timesteps, encoder_hidden_states=conditioning.context).sample


def build_models(args, train_ds):
    """(vae, unet, trainable encoders, frozen components) for ``args``: the mode builds tau_theta (or takes it from
    the pipeline to continue from), the UNet is built around its token width and concatenated channels."""
    mode = mode_named(args.conditioning)
    if args.pretrained_model_name_or_path:
        pipe = LDMPipeline.from_pretrained(args.pretrained_model_name_or_path)
        parts = mode.pretrained_encoders(pipe, args)
        if mode.kind == "concat":
            parts.frozen["vae"] = pipe.vae
        return pipe.vae, pipe.unet, parts.trainable, parts.frozen
    vae = load_autoencoder(args.pretrained_vae_model_name_or_path)
    parts = mode.build_encoders(args, train_ds, vae)
    if mode.kind == "concat":
        parts.frozen["vae"] = vae
    unet = LDMUNet2DConditionModel.from_ldm_config(
        latent_channels=vae.latent_channels_for_diffusion,
        concat_channels=parts.concat_channels,
        context_dim=parts.context_dim,
        base_channels=args.unet_base_channels,
        channel_multipliers=args.unet_channel_multipliers,
        attention_levels=args.unet_attention_levels,
        layers_per_block=args.unet_layers_per_block,
        attention_head_dim=args.attention_head_dim,
        transformer_depth=args.transformer_depth,
        norm_num_groups=args.norm_num_groups,
        sample_size=args.resolution // vae.downsampling_factor,
    )
    return vae, unet, parts.trainable, parts.frozen


# -- models and optimiser ---------------------------------------------------------------------------
def freeze(modules, device, weight_dtype: torch.dtype) -> None:
    """Frozen parts: no gradients, eval mode, on the device, in the mixed-precision dtype (as in diffusers)."""
    for module in modules:
        module.requires_grad_(False).eval().to(device)
        if weight_dtype != torch.float32:
            module.to(dtype=weight_dtype)


def make_denoiser(args, accelerator, unet, mode, trainable: dict, frozen: dict, vae) -> Denoiser:
    """The trained module with the run's switches: xformers, gradient checkpointing, channels-last and
    ``--compile`` (which also compiles, frozen, the encoders that run every step)."""
    if args.enable_xformers_memory_efficient_attention:
        require_xformers(accelerator.device)
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in trainable.values():  # transformers 5 renamed it (the old name warns); 4.x has the old one only
            enable = getattr(encoder, "activation_checkpointing_enable", getattr(encoder, "gradient_checkpointing_enable", None))
            if enable is not None:
                enable()
    if args.channels_last:
        to_channels_last(unet, vae)
    if args.compile:
        compile_module(unet)
        if not args.cache_latents or mode.kind == "concat":
            compile_module(vae.encoder, frozen=True)
        for name, module in frozen.items():  # a frozen encoder that runs every step (a pretrained text encoder)
            if isinstance(module, nn.Module) and name != "vae" and not args.cache_latents:
                compile_module(module, frozen=True, fullgraph=False)
    return Denoiser(unet, mode, trainable, frozen)


def make_optimiser(args, accelerator, denoiser: Denoiser, batches_per_epoch: int):
    """AdamW (torch's fused kernel where the device has one, or bitsandbytes' 8-bit) and the LR schedule;
    sets ``args.max_train_steps`` from ``--num_train_epochs``."""
    lr = args.learning_rate * lr_scale(args, accelerator)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer_cls, kwargs = torch.optim.AdamW, adam_kwargs(args.adam_implementation, params)
    if args.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as err:
            raise SystemExit("--use_8bit_adam needs bitsandbytes (`pip install bitsandbytes`, CUDA).") from err
        optimizer_cls, kwargs = bitsandbytes.optim.AdamW8bit, {}
    optimizer = optimizer_cls(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                              weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **kwargs)
    return optimizer, lr_schedule(args, accelerator, optimizer, batches_per_epoch)


# -- one optimisation step --------------------------------------------------------------------------
def _check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"The diffusion loss became {loss.item()} at step {step}. Lower --learning_rate, use --mixed_precision "
            "bf16 instead of fp16, or keep --max_grad_norm; then resume with --resume_from_checkpoint latest."
        )


def optimisation_step(accelerator, args, objective, batch, epoch: int, denoiser, optimizer, lr_sched,
                      step: int) -> torch.Tensor:
    """Forward, backward, clip, optimiser and LR step on one (micro-)batch; returns the detached loss."""
    with accelerator.accumulate(denoiser):
        loss = objective(batch, epoch, denoiser)
        _check_finite(loss.detach(), step)
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm:
            accelerator.clip_grad_norm_(denoiser.parameters(), args.max_grad_norm)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# -- the run ----------------------------------------------------------------------------------------
class TrainingRun:
    """One ``ldm-diffusers train`` run, in the order it happens: build the data and models (:meth:`build`), wrap
    them for training (:meth:`prepare`), step through the batches (:meth:`run`) and save the pipeline
    (:meth:`finish`)."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.output_dir = args, Path(args.output_dir)
        self.accelerator = make_accelerator(args, self.output_dir, args.logging_dir)
        if args.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        self.mode = mode_named(args.conditioning)
        self.build()
        self.prepare()

    def build(self) -> None:
        """Data splits (or the stream), models (frozen parts in the mixed-precision dtype), the loader's rows."""
        args, accelerator = self.args, self.accelerator
        if args.streaming:
            shards, self.val_ds, held_out = load_stream(args)
            train_ds = self.val_ds  # what build_models and the column checks read: the features and validation rows
        else:
            train_ds, self.val_ds = load_splits(args, accelerator)
        self.vae, self.unet, self.trainable, self.frozen = build_models(args, train_ds)
        self.columns, needed = set_up_columns(args, self.mode, train_ds, self.val_ds, self.vae)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                                torch.float32)
        freeze([self.vae] + [m for m in self.frozen.values() if isinstance(m, nn.Module)], accelerator.device,
               self.weight_dtype)
        if args.streaming:
            self.train_dl = streaming_loader(
                shards, resolution=args.resolution, batch_size=args.train_batch_size, image_column=args.image_column,
                columns=needed, center_crop=args.center_crop, random_flip=args.random_flip, seed=args.seed,
                rank=accelerator.process_index, world_size=accelerator.num_processes,
                shuffle_buffer=args.streaming_shuffle_buffer, num_workers=args.dataloader_num_workers,
                prefetch_batches=args.dataloader_prefetch_factor or 2, pin_memory=accelerator.device.type == "cuda",
                max_samples=args.max_train_samples, exclude=held_out)
            self.train_size = shards.num_rows or "streamed"
        else:
            rows = training_rows(args, accelerator, train_ds, self.vae, self.mode, self.columns, needed, self.frozen,
                                 self.output_dir)
            self.train_dl = data_loader(rows, args, collate_examples, accelerator.device)
            self.train_size = len(rows)

    def prepare(self) -> None:
        """The trained module, optimiser, LR schedule and EMA, wrapped by accelerate; the objective; the loop with
        its resume; validation and evaluation."""
        args, accelerator = self.args, self.accelerator
        denoiser = make_denoiser(args, accelerator, self.unet, self.mode, self.trainable, self.frozen, self.vae)
        self.sharding = ShardedTraining(accelerator, denoiser, share=(denoiser._frozen, denoiser.mode))  # FSDP
        optimizer, lr_sched = make_optimiser(args, accelerator, denoiser, 1 if args.streaming else len(self.train_dl))
        if args.streaming:  # already split across processes, and positioned by its own checkpointed state
            denoiser, optimizer, lr_sched = accelerator.prepare(denoiser, optimizer, lr_sched)
        else:
            denoiser, optimizer, self.train_dl, lr_sched = accelerator.prepare(denoiser, optimizer, self.train_dl,
                                                                               lr_sched)
        self.denoiser, self.optimizer, self.lr_sched = denoiser, optimizer, lr_sched
        self.raw = accelerator.unwrap_model(denoiser)
        self.sharding.after_prepare(optimizer)
        # the UNet's EMA (first of the checkpointed objects): diffusers' EMAModel, or its per-shard twin under FSDP
        self.ema = self.sharding.make_ema(denoiser, "unet", decay=args.ema_decay) if args.use_ema else None
        null_context, context = None, self.mode.frozen_context(self.frozen)
        if context is not None and args.cache_latents:
            with torch.no_grad():
                null_context = context(None).to(self.weight_dtype)
        scheduler = ldm_scheduler("ddpm", args.noise_schedule, args.prediction_type, args.num_train_timesteps)
        self.objective = DiffusionObjective(args, self.mode, self.columns, self.vae, scheduler, self.weight_dtype,
                                            accelerator.device, null_context)
        if args.streaming:  # registered before TrainingLoop's resume loads the checkpoint
            accelerator.register_for_checkpointing(
                StreamCheckpoint(self.train_dl, accelerator.process_index, accelerator.num_processes))
        init_trackers(accelerator, args, self.output_dir, args.tracker_project_name)
        self.loop = TrainingLoop(accelerator, args, self.output_dir, self.train_dl, f"train LDM ({args.conditioning})",
                                 streaming=args.streaming)
        self.validation = ValidationSet(args, self.mode, self.columns, self.val_ds)
        self.evaluation = None
        if args.evaluation_steps and accelerator.is_main_process:
            self.evaluation = SampleEvaluation(args, self.mode, self.columns, self.val_ds)

    def pipeline(self, final: bool = False):
        """The pipeline of the weights now (EMA in the UNet) on the main process, None on the others. Every process
        must call it (a gather under FSDP)."""
        model, model_ema = self.sharding.export(self.denoiser, self.ema)
        if not self.accelerator.is_main_process:
            return None
        return build_pipeline(self.args, model, self.vae, model_ema, final=final)

    def validate(self, step: int) -> None:
        pipe = self.pipeline()
        if self.accelerator.is_main_process:
            self.validation.run(self.accelerator, pipe, self.output_dir, step)

    def evaluate(self, step: int) -> None:
        pipe = self.pipeline()
        if pipe is None or self.evaluation is None:
            return
        scores = self.evaluation.run(self.accelerator, pipe, self.output_dir, step)
        if scores:
            self.accelerator.log(scores, step=step)
            append_log(self.output_dir, step, scores)
            logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))

    def log_start(self) -> None:
        args, accelerator = self.args, self.accelerator
        n_params = sum(p.numel() for p in self.raw.parameters() if p.requires_grad)
        logger.info("Training %s LDM: %.2fM trainable parameters, %s images, %d steps, latents %s, %d process%s (%s)%s.",
                    args.conditioning, n_params / 1e6, self.train_size, args.max_train_steps,
                    "cached" if args.cache_latents else "encoded each step" + (", streamed" if args.streaming else ""),
                    accelerator.num_processes, "es" if accelerator.num_processes > 1 else "",
                    accelerator.distributed_type, ", compiled" if args.compile else "")

    def run(self) -> None:
        """Optimisation steps until ``--max_train_steps`` (or a stop signal): EMA, logs, checkpoints, validation grids
        and evaluations on their schedules."""
        args, accelerator, loop = self.args, self.accelerator, self.loop
        self.log_start()
        self.throughput, losses = Throughput(), []

        def end_of_epoch(epoch: int):
            if args.validation_epochs and epoch % args.validation_epochs == 0:
                self.validate(loop.global_step)

        for batch in loop.batches(on_epoch_end=end_of_epoch):
            losses.append(optimisation_step(accelerator, args, self.objective, batch, loop.epoch, self.denoiser,
                                            self.optimizer, self.lr_sched, loop.global_step))
            self.throughput.add(len(batch["index"]) * accelerator.num_processes)
            if not accelerator.sync_gradients:
                continue
            loop.step_done()
            if self.ema is not None:
                self.ema.step(self.raw.unet.parameters())
            step = loop.global_step
            if step % args.logging_steps == 0 or step == 1:
                self.log_step(step, losses)
            losses = []
            loop.checkpoint_if_due()
            if args.validation_steps and step % args.validation_steps == 0:
                self.validate(step)
            if args.evaluation_steps and (step % args.evaluation_steps == 0 or loop.done):
                self.evaluate(step)
        loop.close()

    def log_step(self, step: int, losses: list) -> None:
        step_loss = self.accelerator.gather(torch.stack(losses).mean().reshape(1)).mean().item()
        scalars = {"loss": step_loss, "lr": self.lr_sched.get_last_lr()[0], **self.throughput.read()}
        self.accelerator.log(scalars, step=step)
        if self.accelerator.is_main_process:
            append_log(self.output_dir, step, scalars)
        self.loop.progress.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{scalars['images_per_s']:.1f}")

    def finish(self) -> dict:
        """Save the whole pipeline (EMA weights in the UNet), its last validation grid unless ``--validation_steps
        0``, the summary, and push it with ``--push_to_hub``; returns the summary."""
        args, accelerator, loop = self.args, self.accelerator, self.loop
        accelerator.wait_for_everyone()
        summary = {"steps": loop.global_step, **self.throughput.summary(), "cache_latents": args.cache_latents,
                   "conditioning": args.conditioning, "compiled": args.compile, "stopped_by_signal": loop.stop.requested}
        pipe = self.pipeline(final=True)
        if accelerator.is_main_process:
            save_pipeline(pipe, self.output_dir)
            if args.validation_steps:
                summary["validation_grid"] = str(self.validation.run(accelerator, pipe, self.output_dir,
                                                                     loop.global_step))
            (self.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
            if args.push_to_hub:
                pipe.push_to_hub(args.hub_model_id or self.output_dir.resolve().name, private=args.hub_private,
                                 token=args.hub_token, model_card_text=training_card_text(args, summary),
                                 datasets=[args.dataset_name] if args.dataset_name and "/" in args.dataset_name else None,
                                 base_model=hub_base_model(args.pretrained_model_name_or_path,
                                                           args.pretrained_vae_model_name_or_path))
        loop.stop.close()  # only now: a late signal must not kill the final save and evaluation
        accelerator.end_training()
        return summary


def train(args: argparse.Namespace) -> dict:
    """Train, save the ``LDMPipeline`` to ``args.output_dir`` and return a summary."""
    run = TrainingRun(args)
    run.run()
    return run.finish()


# -- pipeline, validation, saving -----------------------------------------------------------------
def build_pipeline(args, raw: Denoiser, vae, ema=None, final: bool = False):
    """An ``LDMPipeline`` around the trained parts: an eager copy of the UNet (with the EMA weights if kept)
    when it is compiled or EMA is on, so sampling neither recompiles the training graph nor disturbs it."""
    unet = raw.unet
    if ema is not None or getattr(unet, "_compiled_call_impl", None) is not None:
        unet = type(unet).from_config(unet.config).to(unet.device, unet.dtype)
        unet.load_state_dict(raw.unet.state_dict())
        if ema is not None:
            ema.copy_to(unet.parameters())
    parts = raw.components()
    return LDMPipeline(
        vae=vae, unet=unet, scheduler=ldm_scheduler("ddim", args.noise_schedule, args.prediction_type, args.num_train_timesteps),
        conditioning_mode=raw.mode.name, **{name: getattr(parts, name) for name in raw.mode.components},
    )


def save_pipeline(pipe, output_dir: Path) -> None:
    """``save_pretrained`` into a temporary folder, then move each component into ``output_dir``."""
    tmp = atomic_directory(output_dir / "pipeline")
    for _, module in pipe.components.items():  # weights are saved in float32 whatever the training precision
        if isinstance(module, nn.Module) and module.dtype != torch.float32:
            module.to(dtype=torch.float32)
    pipe.save_pretrained(tmp, safe_serialization=True)
    publish_into(tmp, output_dir)


def training_card_text(args, summary: dict) -> str:
    return (
        f"Trained with `ldm-diffusers` ({args.conditioning} conditioning) for {summary['steps']} steps, batch "
        f"{args.train_batch_size} x {args.gradient_accumulation_steps} accumulation, resolution {args.resolution}, "
        f"learning rate {args.learning_rate}, {args.lr_scheduler} schedule, EMA {'on' if args.use_ema else 'off'}, "
        f"condition dropout {args.conditioning_dropout_prob}, dataset {args.dataset_name or args.train_data_dir}."
    )


def main(argv=None, prog: str | None = None) -> dict:
    return train(parse_args(argv, prog))
