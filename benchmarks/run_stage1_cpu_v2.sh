#!/bin/bash
# The CPU run behind benchmarks/results/stage1_cpu_v2: the shipped KL-f4 autoencoder trained further, reconstruction
# only (L1 + perceptual + KL; the discriminator's start, 50001 as CompVis' KL configs, is beyond the run), one thread.
cd "$(dirname "$0")/.."
python examples/train_autoencoder.py --output_dir outputs/stage1/kl-f4-v2 \
  --pretrained_model_name_or_path src/ldm_diffusers/pretrained/emoji-text-to-image/vae \
  --max_train_steps 3000 --disc_start 50001 --checkpointing_steps 250 --validation_steps 500 --num_cpu_threads 1 \
  --lr_scheduler cosine --lr_warmup_steps 50 --resume_from_checkpoint latest --seed 0 > outputs/stage1-kl-f4-v2.log 2>&1
