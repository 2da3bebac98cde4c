#!/usr/bin/env bash
# One prepared GPU session for stage 1 (run through the device tool; writes to $OUT):
# correctness of fp32/bf16/fp16 training, SDPA attention, xformers if it loads, and the benchmark.
# Expects carried wheels in .whl (diffusers, datasets, efficientnet weights) and the emoji imagefolder
# as .devdata/emoji64.tar (the GPU machine has no apt for the font).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/data && tar xf .devdata/emoji64.tar -C /tmp/data
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/attention_check.txt"
import torch, diffusers
from ldm_diffusers import LDMAutoencoderKL
print("torch", torch.__version__, "diffusers", diffusers.__version__)
m = LDMAutoencoderKL.from_downsampling_factor(4, latent_channels=3, base_channels=32, layers_per_block=1).cuda()
print("default processors:", sorted({type(p).__name__ for p in m.attn_processors.values()}))
x = torch.rand(4, 3, 64, 64, device="cuda") * 2 - 1
with torch.no_grad():
    ref = m(x, sample_posterior=False).sample
    for dt in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", dtype=dt):
            y = m(x, sample_posterior=False).sample
        print(dt, "max |diff| vs fp32:", (y.float() - ref).abs().max().item(), "finite:", bool(torch.isfinite(y).all()))
try:
    m.enable_xformers_memory_efficient_attention()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        y = m(x, sample_posterior=False).sample
    print("xformers ran; max |diff| vs fp32:", (y.float() - ref).abs().max().item())
except Exception as e:
    print("xformers unavailable:", type(e).__name__, str(e)[:300])
PY
for dt in fp32 bf16 fp16; do
  python3 benchmarks/bench_autoencoder.py --dtype $dt --batch 64 --repeats 10 --warmup 3 --out "$OUT/bench_ae_$dt.json" 2>&1 | tail -25
done
for mp in bf16 fp16; do
  start=$(date +%s)
  python3 examples/train_autoencoder.py --train_data_dir /tmp/data/emoji-64 --output_dir /tmp/gpu-$mp \
    --mixed_precision $mp --max_train_steps 400 --disc_start 200 --train_batch_size 64 --skip_rfid \
    --report_to none --checkpointing_steps 200 --validation_steps 400 $( [ $mp = fp16 ] && echo --gradient_checkpointing --use_ema ) \
    > "$OUT/train_$mp.log" 2>&1
  echo "train $mp rc=$? wall=$(( $(date +%s) - start ))s" | tee -a "$OUT/train_summary.txt"
  cp /tmp/gpu-$mp/eval_results.json "$OUT/eval_$mp.json" 2>/dev/null && cat "$OUT/eval_$mp.json"
  tail -n 3 /tmp/gpu-$mp/train_log.jsonl >> "$OUT/train_summary.txt" 2>/dev/null
done
cp /tmp/gpu-bf16/validation/reconstructions-000400.png "$OUT/gpu_bf16_reconstructions.png" 2>/dev/null
true
