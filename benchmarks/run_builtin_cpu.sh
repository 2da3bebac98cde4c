#!/bin/bash
# The CPU runs behind the emoji built-ins of every mode (issue 24): one LDM per conditioning mode in the latent
# space of the continued KL-f4 autoencoder (benchmarks/results/stage1_cpu_v2/vae), on the built-in 64x64 emoji.
#   bash benchmarks/run_builtin_cpu.sh MODE [STEPS]     MODE: super_resolution | inpainting | class
# Writes outputs/builtin/MODE (checkpoints every 500 steps, resumed with --resume_from_checkpoint latest, the
# final pipeline in outputs/builtin/MODE) and outputs/builtin/MODE.log; THREADS (default 1) torch threads.
MODE=${1:?MODE: super_resolution, inpainting or class}
STEPS=${2:-3000}
THREADS=${THREADS:-1}
cd "$(dirname "$0")/.."
mkdir -p outputs/builtin
extra=()
CACHE=--cache_latents  # inpainting's random masks need the stage-1 encoder every step: no latent cache
case "$MODE" in
  inpainting) CACHE= ;;
  class) extra=(--class_column group_id --validation_class_labels 0 1 2 3 4 5 6 7) ;;
esac
start=$(date +%s)
python examples/train_text_to_image.py --pretrained_vae_model_name_or_path benchmarks/results/stage1_cpu_v2/vae \
  --dataset_name emoji --output_dir "outputs/builtin/$MODE" --conditioning "$MODE" --train_batch_size 32 \
  --max_train_steps "$STEPS" --learning_rate 2e-4 --lr_warmup_steps 200 --use_ema --ema_decay 0.999 \
  $CACHE --checkpointing_steps 500 --validation_steps 1000 --num_validation_images 8 \
  --num_cpu_threads "$THREADS" --resume_from_checkpoint latest "${extra[@]}" > "outputs/builtin/$MODE.log" 2>&1
echo "$MODE rc=$? steps=$STEPS threads=$THREADS wall=$(( $(date +%s) - start ))s" >> outputs/builtin/times.txt
