#!/bin/bash
# The CPU run behind benchmarks/results/stage2_cpu: text-to-image LDM on 64x64 emoji in the KL-f4 latent space of
# run_stage1_cpu.sh's autoencoder (steps 1-4,000; run_stage2_cpu_8000.sh continues it with STEPS=8000). Run from
# anywhere.
STEPS=${STEPS:-4000}
LOG=${LOG:-outputs/stage2-text-kl-f4.log}
cd "$(dirname "$0")/.."
start=$(date +%s)
python examples/train_text_to_image.py --pretrained_vae_model_name_or_path outputs/stage1/kl-f4 \
  --output_dir outputs/stage2/text-kl-f4 --conditioning text --train_batch_size 32 --max_train_steps "$STEPS" \
  --learning_rate 2e-4 --lr_warmup_steps 200 --use_ema --ema_decay 0.999 --max_prompt_length 24 --cache_latents \
  --checkpointing_steps 500 --validation_steps 1000 --num_validation_images 8 \
  --validation_prompts "an emoji of red apple" "an emoji of grinning face" "an emoji of dog face" "an emoji of red heart" \
  "an emoji of sun" "an emoji of pizza" "an emoji of rocket" "an emoji of green apple" \
  --resume_from_checkpoint latest > "$LOG" 2>&1
echo "text-kl-f4 rc=$? wall=$(( $(date +%s) - start ))s" >> outputs/stage2-times.txt
