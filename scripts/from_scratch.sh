#!/usr/bin/env bash
# The whole method from scratch on a CPU, small: the emoji dataset, a KL-f4 autoencoder (stage 1), a
# text-to-image LDM in its latent space with a jointly trained text transformer (stage 2), samples, and
# FID / precision / recall on 64 validation captions. About 15 minutes on 2 cores; the numbers are
# those of a model trained for minutes (see model_cards/ldm-emoji-text-to-image.md for a trained one).
#   bash scripts/from_scratch.sh [output folder, default outputs/from_scratch]
set -euo pipefail
OUT=${1:-outputs/from_scratch}
cd "$(dirname "$0")/.."
ldm-diffusers build-emoji
ldm-diffusers train-autoencoder --output_dir "$OUT/kl-f4" --max_train_steps 200 --disc_start 150 \
  --validation_steps 100 --resume_from_checkpoint latest
ldm-diffusers train --pretrained_vae_model_name_or_path "$OUT/kl-f4" --output_dir "$OUT/ldm" --conditioning text \
  --cache_latents --max_train_steps 500 --train_batch_size 32 --learning_rate 2e-4 --lr_warmup_steps 50 \
  --use_ema --ema_decay 0.99 --max_prompt_length 24 --validation_steps 250 --checkpointing_steps 250 \
  --validation_prompts "an emoji of red apple" "an emoji of grinning face" "an emoji of red heart" "an emoji of sun" \
  --resume_from_checkpoint latest
ldm-diffusers generate "an emoji of red apple" "an emoji of red heart" --model "$OUT/ldm" --batch 4 --out "$OUT/samples.png"
python examples/evaluate.py --model "$OUT/ldm" --num_images 64 --out "$OUT/sample_metrics.json"
echo "done: $OUT/kl-f4/eval_results.json (stage 1), $OUT/ldm (pipeline), $OUT/samples.png, $OUT/sample_metrics.json"
