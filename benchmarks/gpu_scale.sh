#!/usr/bin/env bash
# Issues 26 and 30's GPU measurements as ONE device call, from the repository root:
#   device run:  command="bash benchmarks/gpu_scale.sh", carry=[".whl"], timeout_s=540 (under 8 minutes of runs)
# Whole optimizer updates of the real Trainer (benchmarks/bench_update.py) at architecture size with random weights,
# one process and one case each: peak CUDA memory and seconds per update (median of 2 after 1 warm-up update).
# Ordered by priority; each case writes its own JSON, so a cut-off call still returns what it measured. Put the
# numbers beside the estimates of `python -m benchmarks.memory_estimate` (README "Memory before activations") and
# `python -m benchmarks.memory_one_gpu` (README "Training on one 24 GB GPU").
source benchmarks/gpu_setup.sh || exit 1

case_run() {  # case, time limit in seconds, then bench_update's extra options
  timeout "$2" python3 -m benchmarks.bench_update --case "$1" --warmup 1 --iters 2 --json "$OUT/update_$1.json" "${@:3}" \
    2>&1 | tail -n 40 > "$OUT/update_$1.log"
  cat "$OUT/update_$1.json" 2>/dev/null || tail -n 5 "$OUT/update_$1.log"
}
# Budget: build (random init on the GPU) 10-40 s, then 3 updates; SD3.5-M full holds fp32 weights, gradients and
# AdamW state (36 GiB) plus FlowBP's estimator's calls with gradient. The *_24gb cases (issue 30: the one-GPU presets,
# int8 base) run capped to 24 GB; each follows its unquantized bf16 counterpart.
case_run flux_24gb 90 --memory-cap-gb 24
case_run sd35_full_512 140
case_run flux_lora_512_k1 90
case_run sdxl_24gb 75 --memory-cap-gb 24
case_run sdxl_lora_1024_k1 75
