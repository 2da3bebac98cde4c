#!/bin/bash
# The CPU runs behind benchmarks/results/stage1_cpu: 64x64 emoji, KL-f4, KL-f8, VQ-f4, script defaults otherwise.
cd "$(dirname "$0")/.."
for spec in "kl-f4:--regularization kl -f 4 --latent_channels 3" "kl-f8:--regularization kl -f 8 --latent_channels 4" "vq-f4:--regularization vq -f 4 --latent_channels 3 --num_vq_embeddings 1024"; do
  name=${spec%%:*}; opts=${spec#*:}
  start=$(date +%s)
  python examples/train_autoencoder.py --output_dir outputs/stage1/$name $opts --resume_from_checkpoint latest > outputs/stage1-$name.log 2>&1
  echo "$name rc=$? wall=$(( $(date +%s) - start ))s" >> outputs/stage1-times.txt
done
