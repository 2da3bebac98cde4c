#!/usr/bin/env bash
# Issue 15, the CPU half: score what benchmarks/train_builtin_gpu.sh brought back, with the package's own evaluation,
# on the validation split of the emoji set (343 images):
#   autoencoder      `ldm-diffusers evaluate-autoencoder`: PSNR, SSIM, rFID
#   text-to-image    `examples/evaluate.py`, DDIM 50, guidance 1, 2, 3 and 5: FID, precision, recall, IS (the curve)
#   class            `examples/evaluate.py --class_column subgroup_id`, DDIM 50, guidance CLASS_GUIDANCE
#   super-resolution, inpainting   (examples/evaluate.py has no image inputs) the same generate_images /
#                    sample_metrics, one sample per validation image from its 16x16 downsample / a seeded random
#                    mask, given as a user gives them (numpy images in [0, 1]); FID, precision, recall, PSNR, SSIM
# then summary.md with the issue's targets.
#   bash benchmarks/score_builtin.sh <folder with stage1.tar and stage2.tar.part-*> [results folder]
# The models are unpacked to $MODELS (default outputs/builtin_gpu, ignored by git) as complete LDMPipeline folders
# (the shared autoencoder copied into each). About 45 minutes on 2 cores for all 343 images of every model.
# Rehearsal at toy size: RES=16 NUM_IMAGES=16 STEPS=5 AE_MAX_SAMPLES=32 bash benchmarks/score_builtin.sh /tmp/builtin_gpu_out /tmp/scores
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
SRC=${1:?usage: bash benchmarks/score_builtin.sh <folder with stage1.tar and stage2.tar.part-*> [results folder]}
RESULTS=${2:-benchmarks/results/builtin_gpu}
MODELS=${MODELS:-outputs/builtin_gpu}
RES=${RES:-64}; STEPS=${STEPS:-50}; NUM_IMAGES=${NUM_IMAGES:-}; AE_MAX_SAMPLES=${AE_MAX_SAMPLES:-}
GUIDANCES=${GUIDANCES:-"1 2 3 5"}; CLASS_GUIDANCE=${CLASS_GUIDANCE:-3}; CLASS_COLUMN=${CLASS_COLUMN:-subgroup_id}
BATCH=${BATCH:-32}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$RESULTS" "$MODELS"
T0=$(date +%s); took() { echo "$(( $(date +%s) - T0 ))s"; }

# ---- unpack --------------------------------------------------------------------------------------------------
tar xf "$SRC/stage1.tar" -C "$MODELS" || exit 1
if ls "$SRC"/stage2.tar.part-* >/dev/null 2>&1; then
  cat "$SRC"/stage2.tar.part-* | tar x -C "$MODELS" || echo "stage2.tar is incomplete (pieces left out): scoring what it holds"
fi
[ -f "$SRC/run.log" ] && cp "$SRC/run.log" "$RESULTS/run.log"
for job in text-to-image class super-resolution inpainting; do
  if [ -f "$MODELS/$job/model_index.json" ]; then rm -rf "$MODELS/$job/vae" && cp -r "$MODELS/vae" "$MODELS/$job/vae"; fi
done
cp "$MODELS"/stage1/eval_results.json "$RESULTS/autoencoder_gpu_eval.json" 2>/dev/null
echo "unpacked to $MODELS: $(ls "$MODELS" | tr '\n' ' ')"

# ---- stage 1 -------------------------------------------------------------------------------------------------
ldm-diffusers evaluate-autoencoder "$MODELS/vae" --resolution "$RES" ${AE_MAX_SAMPLES:+--max_samples $AE_MAX_SAMPLES} \
  > "$RESULTS/autoencoder_eval.json" && cat "$RESULTS/autoencoder_eval.json"
echo "autoencoder scored at $(took)"

# ---- text-to-image: the FID-vs-guidance curve ------------------------------------------------------------------
N=(); [ -n "$NUM_IMAGES" ] && N=(--num_images "$NUM_IMAGES")
if [ -f "$MODELS/text-to-image/model_index.json" ]; then
  for g in $GUIDANCES; do
    python examples/evaluate.py --model "$MODELS/text-to-image" --resolution "$RES" --steps "$STEPS" --scheduler ddim \
      --guidance_scale "$g" --batch_size "$BATCH" "${N[@]}" --out "$RESULTS/text-to-image_g$g.json" > /dev/null || exit 1
    echo "text-to-image, guidance $g: $(python -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: round(r[k], 3) for k in ('fid', 'precision', 'recall')})" "$RESULTS/text-to-image_g$g.json") at $(took)"
  done
fi
if [ -f "$MODELS/class/model_index.json" ]; then
  python examples/evaluate.py --model "$MODELS/class" --class_column "$CLASS_COLUMN" --resolution "$RES" --steps "$STEPS" \
    --scheduler ddim --guidance_scale "$CLASS_GUIDANCE" --batch_size "$BATCH" "${N[@]}" \
    --out "$RESULTS/class_g$CLASS_GUIDANCE.json" > /dev/null || exit 1
  echo "class scored at $(took)"
fi

# ---- super-resolution and inpainting ---------------------------------------------------------------------------
for job in super-resolution inpainting; do
  [ -f "$MODELS/$job/model_index.json" ] || continue
  python - "$MODELS/$job" "$job" "$RES" "${NUM_IMAGES:-0}" "$STEPS" "$BATCH" "$RESULTS/$job.json" <<'PY' || exit 1
import json, sys
import numpy as np, torch, torch.nn.functional as F
from diffusers.utils import make_image_grid
from ldm_diffusers import LDMPipeline
from ldm_diffusers.conditioning import TrainingColumns
from ldm_diffusers.conditioning.spatial import SuperResolutionMode
from ldm_diffusers.data import load_image_splits, load_pixels, random_inpainting_mask, tensor_to_pil
from ldm_diffusers.evaluation import cached_reference_features, extract_features, generate_images, psnr, sample_metrics, ssim

model, job, res, n, steps, batch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
seed = 0
pipe = LDMPipeline.from_pretrained(model)
_, val = load_image_splits("emoji", None, None, res)
n = min(n or len(val), len(val))
rows = val.select(range(n))
real = load_pixels(rows, res)                                    # [N, 3, R, R] in [0, 1]
settings = {"dataset": "emoji", "resolution": res, "n": n, "fingerprint": val._fingerprint}  # evaluate.py's key
real_features = cached_reference_features("validation", settings, lambda: extract_features(real).numpy())
extra = {}
if job == "super-resolution":
    # the training downsample (bicubic, antialiased, by the autoencoder's f), handed over as a user would: numpy in [0, 1]
    f = pipe.vae_scale_factor
    low = SuperResolutionMode().cache_inputs({"pixel_values": real * 2 - 1}, TrainingColumns(downsampling_factor=f))["low_res"]
    conditions = [{"image": low[i].permute(1, 2, 0).numpy()} for i in range(n)]
    shown = F.interpolate(low, scale_factor=f, mode="nearest")
    bicubic = F.interpolate(low, scale_factor=f, mode="bicubic", align_corners=False).clamp(0, 1)
    extra = {"psnr_bicubic_upsampling": float(psnr(bicubic, real).mean()), "ssim_bicubic_upsampling": float(ssim(bicubic, real).mean()),
             "input_size": list(low.shape[-2:])}
else:
    masks = torch.stack([torch.from_numpy(random_inpainting_mask(res, res, np.random.default_rng([seed, i]))) for i in range(n)])[:, None]
    conditions = [{"image": real[i].permute(1, 2, 0).numpy(), "mask_image": masks[i]} for i in range(n)]
    shown = real * (1 - masks)
    extra = {"mask_fraction": float(masks.mean())}
fake, seconds = generate_images(pipe, conditions, batch, steps, 1.0, seed)
results = sample_metrics(real, fake, torch.from_numpy(real_features))
results.update(psnr=float(psnr(fake, real).mean()), ssim=float(ssim(fake, real).mean()), **extra)
if job == "inpainting":  # the filled region alone, and how much the kept region moved
    err = (fake - real).pow(2).mean(dim=1, keepdim=True)
    filled = (err * masks).flatten(1).sum(1) / masks.flatten(1).sum(1)
    kept = (err * (1 - masks)).flatten(1).sum(1) / (1 - masks).flatten(1).sum(1).clamp_min(1)
    results.update(psnr_filled_region=float((10 * torch.log10(1 / filled.clamp_min(1e-12))).mean()),
                   psnr_kept_region=float((10 * torch.log10(1 / kept.clamp_min(1e-12))).mean()))
results.update(seconds_per_image=seconds, steps=steps, sampler=type(pipe.scheduler).__name__, model=model)
with open(out, "w") as handle:
    json.dump(results, handle, indent=2)
k = min(8, n)  # rows: input (low-res / masked), sample, real
grid = make_image_grid(tensor_to_pil(torch.cat([shown[:k], fake[:k], real[:k]]) * 2 - 1), rows=3, cols=k)
grid.save(out.replace(".json", ".png"))
print(job, {key: round(results[key], 3) for key in ("fid", "precision", "recall", "psnr", "ssim")})
PY
  echo "$job scored at $(took)"
done

# ---- summary against the issue's targets -----------------------------------------------------------------------
python - "$RESULTS" "$GUIDANCES" <<'PY'
import json, sys
from pathlib import Path
res, guidances = Path(sys.argv[1]), sys.argv[2].split()
def load(name):
    p = res / name
    return json.loads(p.read_text()) if p.exists() else None
def mark(ok):
    return "yes" if ok else "**no**"
lines = ["# Scores of the GPU-trained built-in models (benchmarks/score_builtin.sh)", ""]
ae, gpu = load("autoencoder_eval.json"), load("autoencoder_gpu_eval.json")
if ae:
    lines += ["| autoencoder | value | target | met |", "|---|---|---|---|",
              f"| PSNR (dB) | {ae['psnr']:.2f} | >= 28 | {mark(ae['psnr'] >= 28)} |",
              f"| rFID | {ae.get('rfid', float('nan')):.1f} | <= 20 | {mark(ae.get('rfid', 1e9) <= 20)} |",
              f"| SSIM | {ae['ssim']:.3f} | | |", f"| images | {ae['num_images']} | | |"]
    if gpu:
        lines += [f"| training steps (GPU) | {gpu.get('steps')} (stopped by signal: {gpu.get('stopped_by_signal')}) | | |"]
    lines.append("")
rows = [(g, load(f"text-to-image_g{g}.json")) for g in guidances]
rows = [(g, r) for g, r in rows if r]
if rows:
    lines += [f"| text-to-image, DDIM {rows[0][1]['steps']} | FID (target <= 50) | precision (>= 0.5) | recall (>= 0.4) | IS | s/image (CPU) | images |",
              "|---|---|---|---|---|---|---|"]
    for g, r in rows:
        lines.append(f"| guidance {g} | {r['fid']:.1f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['is_efficientnet_mean']:.2f} | {r['seconds_per_image']:.2f} | {r['num_generated']} |")
    g, best = min(rows, key=lambda item: item[1]["fid"])
    ok = best["fid"] <= 50 and best["precision"] >= 0.5 and best["recall"] >= 0.4
    lines += ["", f"Best FID at guidance {g}: targets {'met' if ok else '**not met**'}.", ""]
other = [(name, load(f)) for name, f in (("class", next((p.name for p in sorted(res.glob("class_g*.json"))), "")),
                                          ("super-resolution", "super-resolution.json"), ("inpainting", "inpainting.json"))]
other = [(name, r) for name, r in other if r]
if other:
    lines += ["| model | FID | precision | recall | PSNR | SSIM | guidance | images |", "|---|---|---|---|---|---|---|---|"]
    for name, r in other:
        p = f"{r['psnr']:.2f}" if "psnr" in r else ""
        s = f"{r['ssim']:.3f}" if "ssim" in r else ""
        lines.append(f"| {name} | {r['fid']:.1f} | {r['precision']:.3f} | {r['recall']:.3f} | {p} | {s} | "
                     f"{r.get('guidance_scale', 1.0)} | {r['num_generated']} |")
    sr = load("super-resolution.json")
    if sr:
        lines += ["", f"Super-resolution from {sr['input_size'][0]}x{sr['input_size'][1]} inputs; bicubic upsampling of the "
                  f"same inputs scores PSNR {sr['psnr_bicubic_upsampling']:.2f} dB, SSIM {sr['ssim_bicubic_upsampling']:.3f}."]
    inp = load("inpainting.json")
    if inp:
        lines += [f"Inpainting: PSNR of the filled region {inp['psnr_filled_region']:.2f} dB, of the kept region "
                  f"{inp['psnr_kept_region']:.2f} dB (masks cover {100 * inp['mask_fraction']:.0f}%)."]
(res / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "all scored in $(took); results in $RESULTS"
