#!/bin/bash
# Continuation of run_stage2_cpu.sh for the shipped model: the same command with --max_train_steps 8000, resumed exactly
# from checkpoint-4000 (optimiser, EMA, LR schedule, RNG and data position restored). For the shipped model it
# was stopped with SIGTERM at step 6,967 (a clean stop: checkpoint, pipeline and validation grid written).
cd "$(dirname "$0")/.."
start=$(date +%s)
python examples/train_text_to_image.py --pretrained_vae_model_name_or_path outputs/stage1/kl-f4 \
  --output_dir outputs/stage2/text-kl-f4 --conditioning text --train_batch_size 32 --max_train_steps 8000 \
  --learning_rate 2e-4 --lr_warmup_steps 200 --use_ema --ema_decay 0.999 --max_prompt_length 24 --cache_latents \
  --checkpointing_steps 500 --validation_steps 1000 --num_validation_images 8 \
  --validation_prompts "an emoji of red apple" "an emoji of grinning face" "an emoji of dog face" "an emoji of red heart" \
  "an emoji of sun" "an emoji of pizza" "an emoji of rocket" "an emoji of green apple" \
  --resume_from_checkpoint latest > outputs/stage2-text-kl-f4-8000.log 2>&1
echo "text-kl-f4 rc=$? wall=$(( $(date +%s) - start ))s" >> outputs/stage2-times.txt
