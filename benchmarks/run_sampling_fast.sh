#!/usr/bin/env bash
# The CPU sampling table of benchmarks/results/sampling_fast: DDIM 50 with CFG 3, batch 1 and 8, the built-in model's components and the
# benchmark's default shapes, ours-fast (OpenVINO; inductor for the built-in at batch 1) against stock eager and
# stock with torch.compile(unet).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/sampling_fast
for model in builtin random; do
  for batch in 1 8; do
    python benchmarks/bench_sampling.py --model $model --steps 50 --batch $batch --repeats 3 --fast --backend openvino \
      --out $out/cpu_${model}_b${batch}_openvino.json
  done
done
python benchmarks/bench_sampling.py --model builtin --steps 50 --batch 1 --repeats 3 --fast --backend inductor \
  --out $out/cpu_builtin_b1_inductor.json
