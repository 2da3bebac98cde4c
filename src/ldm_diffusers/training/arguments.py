"""The flags both training scripts take, declared once: data, optimisation, speed, output and the Hub. Each script
adds its own (the model, the loss or the conditioning) and sets its defaults with ``parser.set_defaults``."""

from __future__ import annotations

import argparse

from ..utils.arguments import (
    LR_SCHEDULERS,
    beta,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    seed_type,
)
from .loop import ADAM_IMPLEMENTATIONS


def add_data_arguments(g) -> None:
    g.add_argument("--dataset_name", default=None,
                   help="Hub dataset id, 'emoji' (the built-in emoji) or 'emoji-scenes' (layouts and segmentation maps).")
    g.add_argument("--dataset_config_name", default=None, help="Config of the Hub dataset.")
    g.add_argument("--train_data_dir", default=None, help="Local imagefolder with metadata.jsonl (overrides --dataset_name).")
    g.add_argument("--image_column", default=None, help="Image column (default: the first Image-typed column).")
    g.add_argument("--resolution", type=positive_int, default=64, help="Training resolution (square); divisible by f.")
    g.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True, help="Centre (else random) crop.")
    g.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    g.add_argument("--max_train_samples", type=positive_int, default=None, help="Use only the first N training images.")
    g.add_argument("--dataloader_num_workers", type=non_negative_int, default=0)


def add_optimisation_arguments(g) -> None:
    g.add_argument("--train_batch_size", type=positive_int, default=16, help="Per-device batch size.")
    g.add_argument("--max_train_steps", type=positive_int, default=2000)
    g.add_argument("--num_train_epochs", type=positive_int, default=None, help="Overrides --max_train_steps if set.")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=positive_float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true", help="Multiply the learning rate(s) by batch x accumulation x processes.")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="diffusers' learning-rate schedule.")
    g.add_argument("--lr_warmup_steps", type=non_negative_int, default=0)
    g.add_argument("--adam_beta1", type=beta, default=0.9)
    g.add_argument("--adam_beta2", type=beta, default=0.999)
    g.add_argument("--adam_weight_decay", type=non_negative_float, default=0.0)
    g.add_argument("--max_grad_norm", type=positive_float, default=1.0)
    g.add_argument("--use_ema", action="store_true", help="Keep an EMA of the trained network; the saved model uses it.")
    g.add_argument("--ema_decay", type=probability, default=0.9999)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="Default: the accelerate config's choice.")
    g.add_argument("--seed", type=seed_type, default=0)


def add_speed_arguments(g) -> None:
    """The one-switch speed flags."""
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the trained network once (fullgraph, static shapes) and the frozen encoders "
                        "that run every step (inductor freezing). Compile time is logged.")
    g.add_argument("--channels_last", action="store_true",
                   help="Keep convolution weights and activations channels-last (faster convolutions on recent GPUs "
                        "and with oneDNN).")
    g.add_argument("--adam_implementation", choices=ADAM_IMPLEMENTATIONS, default="auto",
                   help="torch's Adam kernel: 'fused' (one kernel for all parameters), 'foreach' (grouped tensor ops) "
                        "or 'for-loop'; 'auto': fused where torch has it for the device.")
    g.add_argument("--num_cpu_threads", type=positive_int, default=None,
                   help="torch threads per process on a CPU. Default: as launched, except that a process `accelerate "
                        "launch` left at one thread (its CPU default) gets its share of the cores.")
    g.add_argument("--dataloader_prefetch_factor", type=int, default=None,
                   help="Batches each data worker loads ahead (with --dataloader_num_workers > 0; torch's default 2).")


def add_output_arguments(g) -> None:
    g.add_argument("--output_dir", default="outputs/model")
    g.add_argument("--report_to", default="tensorboard", help="accelerate tracker, or 'none'.")
    g.add_argument("--logging_steps", type=positive_int, default=10)
    g.add_argument("--checkpointing_steps", type=positive_int, default=500)
    g.add_argument("--checkpoints_total_limit", type=positive_int, default=3)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    g.add_argument("--validation_steps", type=non_negative_int, default=500,
                   help="Save a validation grid every N steps (0: never, not even at the end).")
    g.add_argument("--num_validation_images", type=positive_int, default=8)
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None)
    g.add_argument("--hub_private", action="store_true")


def training_parser(prog: str | None, description: str) -> argparse.ArgumentParser:
    """A parser with the shared groups: data, optimisation, speed, output (the script adds its own flags to them
    through ``parser.groups[name]`` and its own groups)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.groups = {}
    for name, add in (("data", add_data_arguments), ("optimisation", add_optimisation_arguments),
                      ("speed", add_speed_arguments), ("output, checkpoints, validation", add_output_arguments)):
        p.groups[name] = p.add_argument_group(name)
        add(p.groups[name])
    return p
