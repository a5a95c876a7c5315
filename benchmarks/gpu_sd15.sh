#!/usr/bin/env bash
# The sd15 GPU measurement of issue 7 as ONE device call, from the repository root:
#   device run:  command="bash benchmarks/gpu_sd15.sh", carry=[".whl"], timeout_s=450
# (the numbers in benchmarks/README.md came from an earlier version of this script; see there)
# .whl/ (ignored by git) holds the wheels the device image lacks or has in other versions: diffusers 0.42.1,
# transformers 5.24.0 (+ regex it needs), peft 0.21.2, ml_collections, open_clip_torch (+ ftfy, wcwidth:
# alignprop.rewards imports it). See benchmarks/README.md for the download command. Runs are ordered by
# priority; the JSON is rewritten after each run, so a cut-off call still returns what it measured.
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
check='import torch, diffusers, transformers, peft, accelerate, ml_collections, open_clip
from alignprop import models, sampling
from benchmarks import bench_step
print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "accelerate", accelerate.__version__, torch.cuda.get_device_name())'

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  echo "cpus: $(nproc)"; python3 --version
} > "$OUT/machine.txt" 2>&1
install .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -c "$check" >> "$OUT/machine.txt" 2>&1 || { cat "$OUT/machine.txt"; exit 1; }
cat "$OUT/machine.txt"

# Budget (measured on an H100 in issue 7, per step: K=1 ours 3.4 s / reference 10 s; per_step_uniform
# 8 s / 19 s; full at batch 1 14 s / 29 s): part A ~80 s, part B ~250 s, plus ~15 s start-up each.
bench=(python3 -m benchmarks.bench_step --arch sd15 --device cuda --dtype bf16 --steps 50 --forward-repeats 10)
timeout 120 "${bench[@]}" --warmup 1 --iters 3 \
  --run fixed@4:ours,reference,ours-fold,ours-native \
  --json "$OUT/bench_sd15_a.json" 2>&1 | tee "$OUT/bench_sd15_a.log"
timeout 290 "${bench[@]}" --warmup 0 --iters 2 \
  --run per_step_uniform@4:ours,reference,ours-fold \
  --run full@1:ours,reference,ours-native \
  --run uniform@4:ours,reference \
  --json "$OUT/bench_sd15_b.json" 2>&1 | tee "$OUT/bench_sd15_b.log"
