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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusers.training_utils import compute_snr
from diffusers.utils import make_image_grid

from ..conditioning import Conditioning, TrainingColumns, component_names, mode_named, modes
from ..data.streaming import StreamCheckpoint, resolve_stream, streaming_loader, take_rows
from ..data.transforms import collate_examples, example_transform, image_column_of, load_image_splits, tensor_to_pil
from ..utils.arguments import (
    LR_SCHEDULERS,
    beta,
    check_model_path,
    int_type,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    seed_type,
)
from ..hub import hub_base_model
from ..models.autoencoders import latent_scaling_factor, load_autoencoder
from ..models.unet import LDMUNet2DConditionModel
from ..pipelines import LDMPipeline
from ..schedulers import ldm_scheduler
from ..utils.checkpoints import atomic_directory, publish_into
from .checkpointing import append_log
from .distributed import ShardedTraining
from .latent_cache import at_least_float32, build_latent_cache, encode_latent_moments, weights_digest
from .loop import (
    Throughput,
    TrainingLoop,
    adam_kwargs,
    add_speed_arguments,
    compile_module,
    data_loader,
    init_trackers,
    lr_scale,
    lr_schedule,
    make_accelerator,
    to_channels_last,
)
from .sample_evaluation import SampleEvaluation, fixed_validation_inputs

logger = logging.getLogger(__name__)

def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a latent diffusion model (UNet + conditioning encoder) in the latent space of a "
        f"stage-1 autoencoder. --conditioning picks the mode: {', '.join(m.name for m in modes())}. Flag names "
        "follow diffusers' train_text_to_image.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("models")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="Stage-1 autoencoder folder (from train_autoencoder.py) or any AutoencoderKL/VQModel folder.")
    g.add_argument("--pretrained_model_name_or_path", default=None,
                   help="An LDMPipeline folder to continue from (its vae, unet and encoders).")
    g.add_argument("--conditioning", choices=[m.name for m in modes()], default="text", help="The conditioning mode.")
    g.add_argument("--context_dim", type=positive_int, default=256, help="Token width of the trained encoders.")
    g.add_argument("--unet_base_channels", type=positive_int, default=64)
    g.add_argument("--unet_channel_multipliers", type=positive_int, nargs="+", default=[1, 2, 2])
    g.add_argument("--unet_attention_levels", type=non_negative_int, nargs="*", default=None,
                   help="Levels with transformer blocks (default: all but the first).")
    g.add_argument("--unet_layers_per_block", type=positive_int, default=1)
    g.add_argument("--attention_head_dim", type=positive_int, default=32)
    g.add_argument("--transformer_depth", type=positive_int, default=1)
    g.add_argument("--norm_num_groups", type=positive_int, default=32)

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="Hub dataset id, 'emoji' or 'emoji-scenes' (layouts and segmentation maps); default: the "
                        "mode's own.")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None, help="Local imagefolder with metadata.jsonl.")
    g.add_argument("--image_column", default=None, help="Default: the first Image column.")
    g.add_argument("--resolution", type=positive_int, default=64)
    g.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--max_train_samples", type=positive_int, default=None)
    g.add_argument("--dataloader_num_workers", type=non_negative_int, default=0)
    g.add_argument("--cache_latents", action="store_true",
                   help="Encode the dataset once with the frozen stage-1 encoder (and frozen text encoder).")
    g.add_argument("--latent_cache_dir", default=None, help="Default: <output_dir>/latent_cache.")
    g.add_argument("--cache_dir", default=None, help="datasets/Hub cache folder.")
    g.add_argument("--streaming", action="store_true",
                   help="Stream --dataset_name (a Hub id) or --train_data_dir (a folder of .parquet / webdataset .tar "
                        "shards) shard by shard, never downloading it whole; shards are split across processes and "
                        "a checkpoint holds the exact stream position. Ends at --max_train_steps.")
    g.add_argument("--streaming_shuffle_buffer", type=positive_int, default=1000,
                   help="With --streaming: rows read and shuffled together (a block shuffle that resumes exactly).")

    g = p.add_argument_group("diffusion")
    g.add_argument("--noise_schedule", choices=["text", "class", "unconditional"], default=None,
                   help="Beta preset (default: text for text, class for class, else unconditional).")
    g.add_argument("--num_train_timesteps", type=int_type(2), default=1000)
    g.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon")
    g.add_argument("--conditioning_dropout_prob", "--proportion_empty_prompts", type=float, default=None,
                   help="Probability of training on the null condition (CFG); default 0.1 where the mode has one.")
    g.add_argument("--snr_gamma", type=positive_float, default=None, help="Min-SNR weighting gamma (5.0 is typical).")
    g.add_argument("--noise_offset", type=non_negative_float, default=0.0)
    g.add_argument("--input_perturbation", type=non_negative_float, default=0.0)

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=positive_int, default=16, help="Per-device batch size.")
    g.add_argument("--num_train_epochs", type=positive_int, default=None, help="Overrides --max_train_steps.")
    g.add_argument("--max_train_steps", type=positive_int, default=2000)
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=positive_float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true", help="Multiply by batch x accumulation x processes.")
    g.add_argument("--lr_scheduler", default="constant_with_warmup", choices=LR_SCHEDULERS,
                   help="diffusers' learning-rate schedule.")
    g.add_argument("--lr_warmup_steps", type=non_negative_int, default=100)
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (CUDA).")
    g.add_argument("--adam_beta1", type=beta, default=0.9)
    g.add_argument("--adam_beta2", type=beta, default=0.999)
    g.add_argument("--adam_weight_decay", type=non_negative_float, default=1e-2)
    g.add_argument("--adam_epsilon", type=positive_float, default=1e-8)
    g.add_argument("--max_grad_norm", type=positive_float, default=1.0)
    g.add_argument("--use_ema", action="store_true", help="EMA of the UNet; the saved pipeline uses it.")
    g.add_argument("--ema_decay", type=probability, default=0.9999)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention (CUDA); PyTorch SDPA is the default.")
    g.add_argument("--seed", type=seed_type, default=0)
    add_speed_arguments(p.add_argument_group("speed"))

    g = p.add_argument_group("output, checkpoints, validation")
    g.add_argument("--output_dir", default="outputs/ldm")
    g.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir.")
    g.add_argument("--report_to", default="tensorboard", help="accelerate tracker, or 'none'.")
    g.add_argument("--tracker_project_name", default="train_latent_diffusion")
    g.add_argument("--logging_steps", type=positive_int, default=10)
    g.add_argument("--checkpointing_steps", type=positive_int, default=500)
    g.add_argument("--checkpoints_total_limit", type=positive_int, default=3)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    g.add_argument("--validation_steps", type=non_negative_int, default=500, help="Sample a validation grid every N steps.")
    g.add_argument("--validation_epochs", type=positive_int, default=None, help="Also validate every N epochs.")
    g.add_argument("--num_validation_images", type=positive_int, default=8)
    g.add_argument("--validation_inference_steps", type=int_type(1, 999), default=50)
    g.add_argument("--validation_guidance_scale", type=non_negative_float, default=3.0, help="Used where the mode has a null input.")
    g.add_argument("--evaluation_steps", type=non_negative_int, default=0,
                   help="Every N steps (and at the end) sample one image per validation row with the EMA weights, save them "
                        "to eval_samples/step-N.npz and, if the FID network is installed, log FID / precision / recall.")
    g.add_argument("--evaluation_num_images", type=positive_int, default=None, help="Default: the whole validation split.")
    g.add_argument("--evaluation_batch_size", type=positive_int, default=64)
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None)
    g.add_argument("--hub_private", action="store_true")

    g = p.add_argument_group("conditioning modes (each flag is read by the modes its help names)")
    for mode in modes():
        mode.add_training_arguments(g)
    return p


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not (args.pretrained_vae_model_name_or_path or args.pretrained_model_name_or_path):
        parser.error(
            "pass --pretrained_vae_model_name_or_path (a stage-1 folder: train one with `ldm-diffusers "
            "train-autoencoder --output_dir outputs/kl-f4`) or --pretrained_model_name_or_path (an LDMPipeline)."
        )
    mode = mode_named(args.conditioning)
    has_null = mode.trains_null
    if args.conditioning_dropout_prob is None:
        args.conditioning_dropout_prob = 0.1 if has_null else 0.0
    if not 0 <= args.conditioning_dropout_prob <= 1:
        parser.error("--conditioning_dropout_prob must lie in [0, 1].")
    if args.conditioning_dropout_prob > 0 and not has_null:
        parser.error(f"--conditioning {args.conditioning} has no null input to drop to; leave --conditioning_dropout_prob at 0.")
    if args.streaming:
        check_streaming_args(parser, args)
    if args.dataset_name is None and args.train_data_dir is None:
        args.dataset_name = mode.default_dataset
    if args.noise_schedule is None:
        args.noise_schedule = mode.noise_schedule
    if args.cache_latents and not mode.cacheable:
        parser.error(f"--cache_latents cannot serve --conditioning {args.conditioning}: its random masks need a "
                     "fresh stage-1 encoding every step.")
    check_train_args(parser, args)
    return args


def check_streaming_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What ``--streaming`` cannot combine with: a stream has no length and is read once per step."""
    if not (args.dataset_name or args.train_data_dir) or (args.dataset_name or "").startswith(("emoji", "builtin:")):
        parser.error("--streaming reads --dataset_name (a Hub id) or --train_data_dir (a folder of .parquet or .tar "
                     "shards); the built-in datasets are small: drop --streaming for them.")
    for flag, value in (("--num_train_epochs", args.num_train_epochs), ("--cache_latents", args.cache_latents),
                        ("--validation_epochs", args.validation_epochs)):
        if value:
            parser.error(f"--streaming cannot combine with {flag}: a stream has no length (training ends at "
                         "--max_train_steps) and is not cached.")
    if args.evaluation_steps and not args.evaluation_num_images:
        parser.error("--streaming with --evaluation_steps needs --evaluation_num_images (the rows held out for it).")


def check_train_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-flag checks of ``ldm-diffusers train`` (its parse_args calls them), so that a bad combination fails
    here and not deep inside a model's constructor after the dataset has loaded: model folders exist, UNet widths
    divide into groups and heads, the resolution is a multiple of the stage-1 model's f."""
    for flag in ("pretrained_vae_model_name_or_path", "pretrained_model_name_or_path", "text_encoder_name_or_path",
                 "tokenizer_name_or_path"):
        check_model_path(parser, "--" + flag, getattr(args, flag))
    config = None
    if args.pretrained_model_name_or_path:
        config = Path(args.pretrained_model_name_or_path) / "vae" / "config.json"
    elif args.pretrained_vae_model_name_or_path:
        config = Path(args.pretrained_vae_model_name_or_path) / "config.json"
    if config is not None and config.is_file():
        f = 2 ** (len(json.loads(config.read_text()).get("block_out_channels", [0])) - 1)
        if args.resolution % f:  # SystemExit with the message, as the training loop's own check of it
            raise SystemExit(f"--resolution {args.resolution} is not divisible by the autoencoder's f={f} ({config}).")
    if args.pretrained_model_name_or_path:
        return  # the UNet and encoders come from the pipeline: their flags are not used
    levels = len(args.unet_channel_multipliers)
    widths = [args.unet_base_channels * m for m in args.unet_channel_multipliers]
    for flag, divisor in (("--norm_num_groups", args.norm_num_groups), ("--attention_head_dim", args.attention_head_dim)):
        if any(w % divisor for w in widths):
            parser.error(f"{flag} {divisor} must divide every UNet width (--unet_base_channels x "
                         f"--unet_channel_multipliers = {widths}).")
    bad_levels = [level for level in args.unet_attention_levels or [] if level >= levels]
    if bad_levels:
        parser.error(f"--unet_attention_levels {bad_levels}: the UNet has levels 0..{levels - 1} "
                     f"(one per --unet_channel_multipliers value).")
    mode_named(args.conditioning).check_training_args(parser, args)


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


# -- per-example randomness -------------------------------------------------------------------------
def example_generators(seed: int, epoch: int, indices: torch.Tensor):
    """(torch generator, numpy generator) per example, seeded by (seed, epoch, dataset index)."""
    gens = []
    for index in indices.tolist():
        state = np.random.SeedSequence([seed, epoch, index]).generate_state(2)
        gens.append((torch.Generator().manual_seed(int(state[0])), np.random.default_rng(int(state[1]))))
    return gens


def draw_noise(gens, latent_shape, num_train_timesteps: int, dropout: float) -> dict[str, torch.Tensor]:
    """Each example's draws, stacked over the batch: ``t`` [B], ``noise`` eps, ``offset`` [B, c, 1, 1]
    (noise offset), ``perturbation`` (input perturbation), ``posterior`` (the KL posterior's eps), all
    [B, c, h, w] unless noted, and ``drop`` [B] (condition dropout). Always drawn in this order."""
    draws = {"t": [], "noise": [], "offset": [], "perturbation": [], "posterior": [], "drop": []}
    for g, _ in gens:
        draws["t"].append(torch.randint(0, num_train_timesteps, (), generator=g))
        draws["noise"].append(torch.randn(latent_shape, generator=g))
        draws["offset"].append(torch.randn(latent_shape[0], 1, 1, generator=g))
        draws["perturbation"].append(torch.randn(latent_shape, generator=g))
        draws["posterior"].append(torch.randn(latent_shape, generator=g))
        draws["drop"].append(torch.rand((), generator=g) < dropout)
    return {name: torch.stack(values) for name, values in draws.items()}


# -- data -------------------------------------------------------------------------------------------
class IndexedDataset(torch.utils.data.Dataset):
    """Rows of a transformed ``datasets.Dataset`` with their index (which seeds the example's randomness)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "index": i}


def load_splits(args, accelerator):
    """(train, validation) ``datasets.Dataset`` of the run (``--max_train_samples`` applied)."""
    with accelerator.main_process_first():
        train_ds, val_ds = load_image_splits(
            args.dataset_name, args.dataset_config_name, args.train_data_dir, args.resolution, 0.1, args.seed,
            args.cache_dir,
        )
    if args.max_train_samples:
        train_ds = train_ds.select(range(min(args.max_train_samples, len(train_ds))))
    if args.class_column is None:
        args.class_column = "label" if "label" in train_ds.column_names or "group_id" not in train_ds.column_names else "group_id"
    return train_ds, val_ds


def load_stream(args):
    """``--streaming``: (the training shards, validation rows as a ``datasets.Dataset``, the indices held out of
    training). Validation rows are the source's validation split if it has one, else its first training rows."""
    source = args.train_data_dir or args.dataset_name
    shards = resolve_stream(source, "train", args.dataset_config_name, cache_dir=args.cache_dir)
    n = max(args.num_validation_images, args.evaluation_num_images or 0)
    try:
        validation = resolve_stream(source, "validation", args.dataset_config_name, cache_dir=args.cache_dir)
    except (FileNotFoundError, ValueError):
        val_ds, held_out = take_rows(shards, n)
    else:
        val_ds, held_out = take_rows(validation, n)[0], ()
    if args.class_column is None:
        args.class_column = "label" if "label" in shards.column_names or "group_id" not in shards.column_names else "group_id"
    return shards, val_ds, held_out


def set_up_columns(args, mode, train_ds, val_ds, vae) -> tuple[TrainingColumns, dict]:
    """Check that the datasets have the mode's columns and set their per-example transforms; returns
    (columns, the columns the mode reads)."""
    columns = TrainingColumns.from_args(args, vae.downsampling_factor)
    needed = mode.dataset_columns(columns)
    missing = [c for c in needed if c not in train_ds.column_names]
    if missing:
        flags = columns.flags_for(missing)
        raise SystemExit(f"--conditioning {args.conditioning} reads the column(s) {missing}, which the dataset lacks "
                         f"(it has {train_ds.column_names}); point {' / '.join(flags)} at the right column.")
    if args.resolution % vae.downsampling_factor:
        raise SystemExit(f"--resolution {args.resolution} is not divisible by the autoencoder's f={vae.downsampling_factor}.")
    image_column = image_column_of(train_ds, args.image_column)
    train_ds.set_transform(example_transform(image_column, args.resolution, args.center_crop, args.random_flip, needed))
    val_ds.set_transform(example_transform(image_column, args.resolution, True, False, needed))
    return columns, needed


def training_rows(args, accelerator, train_ds, vae, mode, columns, needed, frozen, output_dir: Path):
    """What the loader draws from: the dataset's rows, or their latent cache (``--cache_latents``)."""
    rows = IndexedDataset(train_ds)
    if not args.cache_latents:
        return rows
    context = mode.frozen_context(frozen)
    settings = {
        "vae": weights_digest(vae), "dataset": train_ds._fingerprint, "resolution": args.resolution,
        "center_crop": args.center_crop, "random_flip": args.random_flip, "columns": needed, "seed": args.seed,
        "mode": args.conditioning, "f": vae.downsampling_factor,
        "frozen": {name: weights_digest(m) for name, m in frozen.items() if isinstance(m, nn.Module) and name != "vae"}
        if context else None, "max_prompt_length": getattr(args, "max_prompt_length", None),
    }
    cache_dir = Path(args.latent_cache_dir or output_dir / "latent_cache")  # seen by every process
    return build_latent_cache(  # every process encodes its shards of the set, in parallel
        rows, vae, mode, columns, cache_dir, settings,
        context,
        batch_size=args.train_batch_size, show_progress=accelerator.is_local_main_process,
        rank=accelerator.process_index, world_size=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
        num_workers=args.dataloader_num_workers,
    )


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
        from ..utils.attention import require_xformers

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
class DiffusionObjective:
    """The LDM objective on one batch (see the module docstring): ``objective(batch, epoch, denoiser)`` -> loss.

    ``null_context``: the empty prompt's frozen tokens, which condition dropout swaps in for cached tokens."""

    def __init__(self, args, mode, columns, vae, noise_scheduler, weight_dtype: torch.dtype, device,
                 null_context: torch.Tensor | None = None):
        self.args, self.mode, self.columns, self.vae = args, mode, columns, vae
        self.noise_scheduler, self.weight_dtype, self.device = noise_scheduler, weight_dtype, device
        self.scale = latent_scaling_factor(vae)
        self.null_context = null_context

    def latent_moments(self, batch) -> dict[str, torch.Tensor]:
        """The batch's stage-1 encoding, unscaled: from the cache, or the frozen encoder on its pixels."""
        if "latent_mean" in batch or "latents" in batch:
            return {k: batch[k] for k in ("latent_mean", "latent_std", "latents") if k in batch}
        return encode_latent_moments(self.vae, batch["pixel_values"])

    def clean_latents(self, moments: dict, posterior_noise: torch.Tensor) -> torch.Tensor:
        """z0 [B, c, h, w], scaled; a KL posterior is sampled with ``posterior_noise``, as CompVis'
        get_first_stage_encoding."""
        if "latents" in moments:
            return at_least_float32(moments["latents"].to(self.device)) * self.scale
        return (at_least_float32(moments["latent_mean"].to(self.device))
                + at_least_float32(moments["latent_std"].to(self.device)) * posterior_noise) * self.scale

    def __call__(self, batch, epoch: int, denoiser) -> torch.Tensor:
        args, device = self.args, self.device
        gens = example_generators(args.seed, epoch, batch["index"])
        moments = self.latent_moments(batch)
        base = moments.get("latents", moments.get("latent_mean"))
        draws = draw_noise(gens, tuple(base.shape[1:]), self.noise_scheduler.config.num_train_timesteps,
                           args.conditioning_dropout_prob)
        draws = {name: value.to(device, non_blocking=True) for name, value in draws.items()}
        t, drop = draws["t"], draws["drop"]
        z0 = self.clean_latents(moments, draws["posterior"])
        noise = draws["noise"] + args.noise_offset * draws["offset"]
        noisy = self.noise_scheduler.add_noise(z0, noise + args.input_perturbation * draws["perturbation"], t)
        target = noise if args.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(z0, noise, t)

        raw = getattr(denoiser, "module", denoiser)
        conditioning, values = None, None
        if "context" in batch:  # cached frozen text tokens; dropout swaps in the empty prompt's tokens
            context = batch["context"].to(device, self.weight_dtype)
            context = torch.where(drop.view(-1, 1, 1), self.null_context.expand_as(context), context)
            conditioning = Conditioning(context=context)
        else:
            values = self.mode.training_inputs(batch, self.columns, [np_rng for _, np_rng in gens])
            values = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
            values = self.mode.drop(raw.components(), values, drop)
        if self.args.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32):
            pred = denoiser(noisy, t, values, conditioning)
        pred, target = at_least_float32(pred), at_least_float32(target)
        if args.snr_gamma is None:
            return F.mse_loss(pred, target)
        snr = compute_snr(self.noise_scheduler, t)
        weights = torch.clamp(snr, max=args.snr_gamma) / (snr + 1 if args.prediction_type == "v_prediction" else snr)
        per_example = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        return (per_example * weights).mean()


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
def train(args: argparse.Namespace) -> dict:
    """Train, save the ``LDMPipeline`` to ``args.output_dir`` and return a summary."""

    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir, args.logging_dir)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    mode = mode_named(args.conditioning)

    # Build: data splits, models (frozen parts in the mixed-precision dtype) ----------------------------
    if args.streaming:
        shards, val_ds, held_out = load_stream(args)
        train_ds = val_ds  # what build_models and the column checks read: the features and validation rows
    else:
        train_ds, val_ds = load_splits(args, accelerator)
    vae, unet, trainable, frozen = build_models(args, train_ds)
    columns, needed = set_up_columns(args, mode, train_ds, val_ds, vae)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    freeze([vae] + [m for m in frozen.values() if isinstance(m, nn.Module)], accelerator.device, weight_dtype)

    # Data: the dataset's rows or their latent cache, or the stream --------------------------------------
    if args.streaming:
        train_dl = streaming_loader(
            shards, resolution=args.resolution, batch_size=args.train_batch_size, image_column=args.image_column,
            columns=needed, center_crop=args.center_crop, random_flip=args.random_flip, seed=args.seed,
            rank=accelerator.process_index, world_size=accelerator.num_processes,
            shuffle_buffer=args.streaming_shuffle_buffer, num_workers=args.dataloader_num_workers,
            prefetch_batches=args.dataloader_prefetch_factor or 2, pin_memory=accelerator.device.type == "cuda",
            max_samples=args.max_train_samples, exclude=held_out,
        )
        train_size = shards.num_rows or "streamed"
    else:
        train_rows = training_rows(args, accelerator, train_ds, vae, mode, columns, needed, frozen, output_dir)
        train_dl = data_loader(train_rows, args, collate_examples, accelerator.device)
        train_size = len(train_rows)

    # The trained module, optimiser, schedules, EMA ---------------------------------------------------
    denoiser = make_denoiser(args, accelerator, unet, mode, trainable, frozen, vae)
    sharding = ShardedTraining(accelerator, denoiser, share=(denoiser._frozen, denoiser.mode))  # FSDP: see distributed.py
    optimizer, lr_sched = make_optimiser(args, accelerator, denoiser, 1 if args.streaming else len(train_dl))
    if args.streaming:  # already split across processes, and positioned by its own checkpointed state
        denoiser, optimizer, lr_sched = accelerator.prepare(denoiser, optimizer, lr_sched)
    else:
        denoiser, optimizer, train_dl, lr_sched = accelerator.prepare(denoiser, optimizer, train_dl, lr_sched)
    raw = accelerator.unwrap_model(denoiser)
    sharding.after_prepare(optimizer)
    # the UNet's EMA (first of the checkpointed objects): diffusers' EMAModel, or its per-shard twin under FSDP
    ema = sharding.make_ema(denoiser, "unet", decay=args.ema_decay) if args.use_ema else None
    null_context, context = None, mode.frozen_context(frozen)
    if context is not None and args.cache_latents:
        with torch.no_grad():
            null_context = context(None).to(weight_dtype)
    objective = DiffusionObjective(
        args, mode, columns, vae, ldm_scheduler("ddpm", args.noise_schedule, args.prediction_type, args.num_train_timesteps),
        weight_dtype, accelerator.device, null_context,
    )
    if args.streaming:  # registered before TrainingLoop's resume loads the checkpoint
        accelerator.register_for_checkpointing(
            StreamCheckpoint(train_dl, accelerator.process_index, accelerator.num_processes))
    init_trackers(accelerator, args, output_dir, args.tracker_project_name)

    # Resume, validation, evaluation --------------------------------------------------------------------
    loop = TrainingLoop(accelerator, args, output_dir, train_dl, f"train LDM ({args.conditioning})",
                        streaming=args.streaming)
    validation = ValidationSet(args, mode, columns, val_ds)

    def validate(step: int):
        model, model_ema = sharding.export(denoiser, ema)  # on every process (a gather under FSDP)
        if accelerator.is_main_process:
            validation.run(accelerator, build_pipeline(args, model, vae, model_ema), output_dir, step)

    evaluation = None
    if args.evaluation_steps and accelerator.is_main_process:
        evaluation = SampleEvaluation(args, mode, columns, val_ds)

    def evaluate(step: int):
        model, model_ema = sharding.export(denoiser, ema)  # on every process (a gather under FSDP)
        if evaluation is not None:
            scores = evaluation.run(accelerator, build_pipeline(args, model, vae, model_ema), output_dir, step)
            if scores:
                accelerator.log(scores, step=step)
                append_log(output_dir, step, scores)
                logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))

    def end_of_epoch(epoch: int):
        if args.validation_epochs and epoch % args.validation_epochs == 0:
            validate(loop.global_step)

    n_params = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    logger.info("Training %s LDM: %.2fM trainable parameters, %d images, %d steps, latents %s, %d process%s (%s)%s.",
                args.conditioning, n_params / 1e6, train_size, args.max_train_steps,
                "cached" if args.cache_latents else "encoded each step" + (", streamed" if args.streaming else ""),
                accelerator.num_processes,
                "es" if accelerator.num_processes > 1 else "", accelerator.distributed_type,
                ", compiled" if args.compile else "")

    # The loop ---------------------------------------------------------------------------------------------
    throughput, losses = Throughput(), []
    for batch in loop.batches(on_epoch_end=end_of_epoch):
        losses.append(optimisation_step(accelerator, args, objective, batch, loop.epoch, denoiser, optimizer,
                                        lr_sched, loop.global_step))
        throughput.add(len(batch["index"]) * accelerator.num_processes)
        if not accelerator.sync_gradients:
            continue
        loop.step_done()
        if ema is not None:
            ema.step(raw.unet.parameters())
        step = loop.global_step
        if step % args.logging_steps == 0 or step == 1:
            step_loss = accelerator.gather(torch.stack(losses).mean().reshape(1)).mean().item()
            scalars = {"loss": step_loss, "lr": lr_sched.get_last_lr()[0], **throughput.read()}
            accelerator.log(scalars, step=step)
            if accelerator.is_main_process:
                append_log(output_dir, step, scalars)
            loop.progress.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{scalars['images_per_s']:.1f}")
        losses = []
        loop.checkpoint_if_due()
        if args.validation_steps and step % args.validation_steps == 0:
            validate(step)
        if args.evaluation_steps and (step % args.evaluation_steps == 0 or loop.done):
            evaluate(step)
    loop.close()

    # The whole pipeline, EMA weights in the UNet ----------------------------------------------------
    accelerator.wait_for_everyone()
    summary = {"steps": loop.global_step, **throughput.summary(), "cache_latents": args.cache_latents,
               "conditioning": args.conditioning, "compiled": args.compile, "stopped_by_signal": loop.stop.requested}
    model, model_ema = sharding.export(denoiser, ema)  # on every process (a gather under FSDP)
    if accelerator.is_main_process:
        pipe = build_pipeline(args, model, vae, model_ema, final=True)
        save_pipeline(pipe, output_dir)
        summary["validation_grid"] = str(validation.run(accelerator, pipe, output_dir, loop.global_step))
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        if args.push_to_hub:
            repo_id = args.hub_model_id or output_dir.resolve().name
            pipe.push_to_hub(repo_id, private=args.hub_private, token=args.hub_token,
                             model_card_text=training_card_text(args, summary),
                             datasets=[args.dataset_name] if args.dataset_name and "/" in args.dataset_name else None,
                             base_model=hub_base_model(args.pretrained_model_name_or_path,
                                                       args.pretrained_vae_model_name_or_path))
    loop.stop.close()  # only now: a late signal must not kill the final save and evaluation
    accelerator.end_training()
    return summary


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


class ValidationSet:
    """Fixed inputs for validation grids: prompts, class labels or the first validation rows' inputs."""

    def __init__(self, args, mode, columns, val_ds):
        self.args, self.mode = args, mode
        n = min(args.num_validation_images, len(val_ds))
        self.references, self.values, self.guidance = fixed_validation_inputs(args, mode, columns, val_ds, n)
        given = mode.validation_values(args)
        if given is not None:
            self.values, self.references = given, None
        self.batch = n

    def run(self, accelerator, pipe, output_dir: Path, step: int) -> Path:
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(self.args.seed)
        kwargs = dict(self.values) if self.values else {"batch_size": self.batch}
        with torch.no_grad():
            images = pipe(**kwargs, num_inference_steps=self.args.validation_inference_steps,
                          guidance_scale=self.guidance, generator=generator, output_type="pt").images
        samples = tensor_to_pil(images * 2 - 1)
        rows = [samples]
        if self.references is not None:
            rows.insert(0, tensor_to_pil(self.references))
        grid = make_image_grid([im for row in rows for im in row], rows=len(rows), cols=len(samples))
        folder = output_dir / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"samples-{step:06d}.png"
        grid.save(path)
        captions = self.values.get("prompt")
        if captions:
            (folder / "prompts.txt").write_text("\n".join(captions) + "\n")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation/samples", np.asarray(grid), step, dataformats="HWC")
        return path


def training_card_text(args, summary: dict) -> str:
    return (
        f"Trained with `ldm-diffusers` ({args.conditioning} conditioning) for {summary['steps']} steps, batch "
        f"{args.train_batch_size} x {args.gradient_accumulation_steps} accumulation, resolution {args.resolution}, "
        f"learning rate {args.learning_rate}, {args.lr_scheduler} schedule, EMA {'on' if args.use_ema else 'off'}, "
        f"condition dropout {args.conditioning_dropout_prob}, dataset {args.dataset_name or args.train_data_dir}."
    )


def main(argv=None, prog: str | None = None) -> dict:
    return train(parse_args(argv, prog))
