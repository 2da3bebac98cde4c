"""Tiny command lines for both training scripts (16x16 images, tiny models, no trackers) and their logs."""

import json


def stage1_args(data_dir, out, *extra):
    return [
        "--train_data_dir", str(data_dir), "--resolution", "16", "--output_dir", str(out),
        "--base_channels", "8", "--norm_num_groups", "4", "--disc_channels", "8", "--disc_layers", "2",
        "--train_batch_size", "4", "--max_train_samples", "8", "--num_validation_images", "4",
        "--max_eval_samples", "8", "--scaling_factor_samples", "8", "--logging_steps", "1", "--seed", "3",
        *extra,
    ]


def stage2_args(stage1, data_dir, out, *extra):
    return [
        "--pretrained_vae_model_name_or_path", str(stage1), "--train_data_dir", str(data_dir), "--resolution", "16",
        "--output_dir", str(out), "--unet_base_channels", "16", "--unet_channel_multipliers", "1", "2",
        "--norm_num_groups", "8", "--attention_head_dim", "8", "--context_dim", "32", "--text_encoder_layers", "1",
        "--text_encoder_heads", "2", "--max_prompt_length", "8", "--layout_encoder_layers", "1",
        "--train_batch_size", "4", "--max_train_samples", "4", "--logging_steps", "1", "--seed", "3",
        "--num_validation_images", "2", "--validation_inference_steps", "2", "--validation_steps", "0",
        "--checkpointing_steps", "100", "--report_to", "none", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        *extra,
    ]


def read_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
