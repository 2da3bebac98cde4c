"""The flags of ``ldm-diffusers train`` (stage 2): the shared training flags, the UNet, data, diffusion and
validation flags, and each registered conditioning mode's own; checked as far as they can be before anything
loads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..conditioning import mode_named, modes
from ..utils.arguments import (
    check_model_path,
    int_type,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from .arguments import training_parser


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = training_parser(prog, "Train a latent diffusion model (UNet + conditioning encoder) in the latent space of a "
                              f"stage-1 autoencoder. --conditioning picks the mode: {', '.join(m.name for m in modes())}. "
                              "Flag names follow diffusers' train_text_to_image.py.")
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
    add_data_arguments(p.groups["data"])
    add_diffusion_arguments(p.add_argument_group("diffusion"))
    g = p.groups["optimisation"]
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (CUDA).")
    g.add_argument("--adam_epsilon", type=positive_float, default=1e-8)
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention (CUDA); PyTorch SDPA is the default.")
    add_validation_arguments(p.groups["output, checkpoints, validation"])
    g = p.add_argument_group("conditioning modes (each flag is read by the modes its help names)")
    for mode in modes():
        mode.add_training_arguments(g)
    p.set_defaults(adam_weight_decay=1e-2, lr_scheduler="constant_with_warmup", lr_warmup_steps=100,
                   output_dir="outputs/ldm")
    return p


def add_data_arguments(g) -> None:
    g.add_argument("--cache_latents", action="store_true",
                   help="Encode the dataset once with the frozen stage-1 encoder (and a frozen text encoder).")
    g.add_argument("--latent_cache_dir", default=None, help="Default: <output_dir>/latent_cache.")
    g.add_argument("--cache_dir", default=None, help="datasets/Hub cache folder.")
    g.add_argument("--streaming", action="store_true",
                   help="Stream --dataset_name (a Hub id) or --train_data_dir (a folder of .parquet / webdataset .tar "
                        "shards) shard by shard, never downloading it whole; shards are split across processes and "
                        "a checkpoint holds the exact stream position. Ends at --max_train_steps.")
    g.add_argument("--streaming_shuffle_buffer", type=positive_int, default=1000,
                   help="With --streaming: rows read and shuffled together (a block shuffle that resumes exactly).")


def add_diffusion_arguments(g) -> None:
    g.add_argument("--noise_schedule", choices=["text", "class", "unconditional"], default=None,
                   help="Beta preset (default: the mode's own).")
    g.add_argument("--num_train_timesteps", type=int_type(2), default=1000)
    g.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon")
    g.add_argument("--conditioning_dropout_prob", "--proportion_empty_prompts", type=float, default=None,
                   help="Probability of training on the null condition (CFG); default 0.1 where the mode has one.")
    g.add_argument("--snr_gamma", type=positive_float, default=None, help="Min-SNR weighting gamma (5.0 is typical).")
    g.add_argument("--noise_offset", type=non_negative_float, default=0.0)
    g.add_argument("--input_perturbation", type=non_negative_float, default=0.0)


def add_validation_arguments(g) -> None:
    g.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir.")
    g.add_argument("--tracker_project_name", default="train_latent_diffusion")
    g.add_argument("--validation_epochs", type=positive_int, default=None, help="Also validate every N epochs.")
    g.add_argument("--validation_inference_steps", type=int_type(1, 999), default=50)
    g.add_argument("--validation_guidance_scale", type=non_negative_float, default=3.0,
                   help="Used where the mode has a null input.")
    g.add_argument("--evaluation_steps", type=non_negative_int, default=0,
                   help="Every N steps (and at the end) sample one image per validation row with the EMA weights, save "
                        "them to eval_samples/step-N.npz and, if the FID network is installed, log FID / precision / "
                        "recall.")
    g.add_argument("--evaluation_num_images", type=positive_int, default=None, help="Default: the whole validation split.")
    g.add_argument("--evaluation_batch_size", type=positive_int, default=64)


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
