"""Whole optimizer updates of the real Trainer at architecture size (random weights): peak memory, seconds per update.

Where `bench_step` compares samplers on one micro-batch, this runs `Trainer.train_update` itself (the gradient path,
decode, a weight-free reward, backward, clipping, AdamW, EMA) on a pipeline built in memory by
`benchmarks/architectures.py` (no download; the weights are random, the shapes and the arithmetic real), configured by
a preset plus the case's overrides through the same `session.configure_model` as a run. One case per process, so the
peak is the case's own (CUDA max allocated, weights included; on the CPU the process's peak RSS).

Cases (`CASES`): the issue-26 GPU checks, and tiny CPU versions of each (what tests/test_bench_smoke.py runs).

    python -m benchmarks.bench_update --case sd35_full_512 --iters 2 --json out.json      # on a GPU
    python -m benchmarks.bench_update --case tiny_sd3_full --device cpu --iters 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignprop.batching import fill_derived_fields, plan_batches
from alignprop.families import family_of
from alignprop.models import inference_dtype
from alignprop.presets import load_preset
from alignprop.rewards import build_reward
from alignprop.session import Session, configure_model, make_accelerator
from alignprop.train import Trainer
from benchmarks.architectures import build_pipeline
from benchmarks.bench_step import rss_kib


@dataclass(frozen=True)
class Case:
    arch: str  # benchmarks/architectures.py
    preset: str
    overrides: dict = field(default_factory=dict)
    description: str = ""


K1 = {"gradient_path": "truncation", "truncation_strategy": "fixed", "truncated_backprop_rand": False}
CASES = {
    "sdxl_lora_1024_k1": Case("sdxl", "hps_sdxl", {**K1, "resolution": 1024}, "SDXL 1024 px, LoRA, K=1"),
    "sd35_full_512": Case("sd35", "hps_sd35_full", {}, "SD3.5-M 512 px, every weight, FlowBP's preset, 1 process"),
    "flux_lora_512_k1": Case("flux", "hps_flux", {**K1, "resolution": 512}, "FLUX.1 512 px, LoRA, K=1, block ckpt"),
    "tiny_sdxl_lora": Case("tiny_sdxl", "hps_sdxl", {**K1, "steps": 4}, "CPU smoke"),
    "tiny_sd3_full": Case("tiny_sd3", "hps_sd35_full", {"steps": 4, "resolution": None}, "CPU smoke"),
    "tiny_flux_lora": Case("tiny_flux", "hps_flux", {**K1, "steps": 4}, "CPU smoke"),
}


def case_config(case: Case, device: torch.device):
    """The preset with the case's overrides, a weight-free reward, shipped prompt sets, one sample per update."""
    config = load_preset(case.preset)
    config.update({key: value for key, value in case.overrides.items()})
    config.reward_fn = "colorfulness"  # no reward weights to download; the images still carry the gradient
    config.prompt_fn, config.eval_prompt_fn = "simple_animals", "eval_simple_animals"
    config.train.update(total_batch_size=1, total_samples_per_epoch=1, batch_size_per_gpu_available=1)
    if config.truncation_strategy == "fixed":
        config.truncated_backprop_minmax, config.trunc_backprop_timestep = (0, config.steps), config.steps - 1
    if device.type == "cpu":
        config.mixed_precision = "no"
    return config


def build_trainer(case: Case, device: torch.device, run_dir: Path) -> Trainer:
    config = case_config(case, device)
    dtype = inference_dtype(config.mixed_precision)
    pipeline = build_pipeline(case.arch, device, dtype)
    model = family_of(pipeline)
    configure_model(model, config, device)
    reward = build_reward(config, device, dtype)
    session = Session(make_accelerator(config), dtype, model, reward, {})
    batches = plan_batches(config.train, 1)
    fill_derived_fields(config.train, batches)
    return Trainer(config, batches, run_dir, session)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return rss_kib("VmHWM") * 1024


def measure(name: str, device: torch.device, warmup: int, iters: int) -> dict:
    """Median seconds per update and the peak memory over `warmup + iters` updates."""
    case = CASES[name]
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        trainer = build_trainer(case, device, Path(run_dir))
        built = time.perf_counter() - started
        seconds = []
        for index in range(warmup + iters):
            begin = time.perf_counter()
            trainer.train_update()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index >= warmup:
                seconds.append(time.perf_counter() - begin)
        config = trainer.config
    return {
        "case": name,
        "description": case.description,
        "arch": case.arch,
        "finetune": config.train.finetune,
        "resolution": list(trainer.model.image_size),
        "gradient_path": config.gradient_path,
        "steps": config.steps,
        "trainable_parameters": sum(param.numel() for param in trainer.params),
        "denoiser_parameters": sum(param.numel() for param in trainer.denoiser.parameters()),
        "seconds_per_update": statistics.median(seconds),
        "peak_gib": peak_bytes(device) / 2**30,
        "build_seconds": built,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = measure(args.case, torch.device(args.device), args.warmup, args.iters)
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
