#!/usr/bin/env bash
# The sd15 GPU measurement of issue 7 as ONE device call, from the repository root:
#   device run:  command="bash benchmarks/gpu_sd15.sh", carry=[".whl"], timeout_s=540 (under 8 minutes of runs)
# (the numbers in benchmarks/README.md came from an earlier version of this script; see there)
# .whl/ (ignored by git) holds the wheels the device image lacks or has in other versions: diffusers 0.42.1,
# transformers 5.24.0 (+ regex it needs), peft 0.21.2, ml_collections, open_clip_torch (+ ftfy, wcwidth:
# alignprop.rewards imports it). See benchmarks/README.md for the download command. Runs are ordered by
# priority; the JSON is rewritten after each run, so a cut-off call still returns what it measured.
source benchmarks/gpu_setup.sh || exit 1

# Budget (measured on an H100 in issue 7, per step: K=1 ours 3.4 s / reference 10 s; per_step_uniform
# 8 s / 19 s): part A ~90 s, part C ~140 s, part D ~170 s (compilation included), part B ~60 s, plus ~15 s start-up
# each: under 8 minutes. H100/H200 SXM dense bf16: 989 TFLOP/s (flop_efficiency = measured / FLOP-limited time).
bench=(python3 -m benchmarks.bench_step --arch sd15 --device cuda --dtype bf16 --steps 50 --forward-repeats 10
       --peak-tflops 989)
# Part A: one K=1 step of 4 prompts.
timeout 110 "${bench[@]}" --warmup 1 --iters 3 \
  --run fixed@4:ours,reference,ours-native \
  --json "$OUT/bench_sd15_a.json" 2>&1 | tee "$OUT/bench_sd15_a.log"
# Part C (issue 18): whole updates of 4 micro-batches of 4, K=1, with the no-grad prefix of the update in one
# batch (ours-prefix = train.no_grad_batch_size >= 16) and without it (ours), against the reference loop.
timeout 150 "${bench[@]}" --warmup 0 --iters 2 --accumulation 4 \
  --run fixed@4:ours,reference,ours-prefix \
  --json "$OUT/bench_sd15_c.json" 2>&1 | tee "$OUT/bench_sd15_c.log"
# Part D (issue 18): the same updates with the no-grad calls compiled (compile_denoiser=default) and captured as CUDA
# graphs (reduce-overhead); the first update (first_ms) includes the compilation.
timeout 180 "${bench[@]}" --warmup 1 --iters 2 --accumulation 4 \
  --run fixed@4:ours-prefix,ours-prefix-compile,ours-prefix-graphs \
  --json "$OUT/bench_sd15_d.json" 2>&1 | tee "$OUT/bench_sd15_d.log"
timeout 70 "${bench[@]}" --warmup 0 --iters 1 \
  --run per_step_uniform@4:ours,reference,ours-graphs \
  --json "$OUT/bench_sd15_b.json" 2>&1 | tee "$OUT/bench_sd15_b.log"
