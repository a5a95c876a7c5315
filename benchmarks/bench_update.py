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
import gc
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
from alignprop.quantization import quantized_layers
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
    # Issue 30: the one-GPU presets as shipped (int8 base), on a GPU capped to 24 GB (--memory-cap-gb 24); the bf16
    # cases above are the same models unquantized.
    "sdxl_24gb": Case("sdxl", "hps_sdxl_24gb", {}, "SDXL 1024 px, int8 UNet, LoRA, K=1 (hps_sdxl_24gb)"),
    "flux_24gb": Case("flux", "hps_flux_24gb", {}, "FLUX.1 512 px, int8 transformer and T5, LoRA, K=1 (hps_flux_24gb)"),
    "tiny_sdxl_lora": Case("tiny_sdxl", "hps_sdxl", {**K1, "steps": 4}, "CPU smoke"),
    "tiny_sd3_full": Case("tiny_sd3", "hps_sd35_full", {"steps": 4, "resolution": None}, "CPU smoke"),
    "tiny_flux_lora": Case("tiny_flux", "hps_flux", {**K1, "steps": 4}, "CPU smoke"),
    "tiny_flux_24gb": Case("tiny_flux", "hps_flux_24gb", {"steps": 4, "resolution": None}, "CPU smoke"),
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


def quantize_in_memory(model, config) -> None:
    """`pretrained.quantize*` applied to a pipeline built in memory: torchao's `quantize_`, what diffusers' and
    transformers' TorchAoConfig run at load (the same int8 / fp8 tensors, which peft then wraps in its LoRA class)."""
    from alignprop.quantization import TORCHAO_MODES, torchao_config

    denoiser_mode, text_mode = config.pretrained.quantize, config.pretrained.quantize_text_encoders
    targets = [(model.denoiser, denoiser_mode)] + [
        (getattr(model.pipeline, name), text_mode) for name in model.text_encoder_names
    ]
    for module, mode in targets:
        if mode in TORCHAO_MODES:
            from torchao.quantization import quantize_

            quantize_(module, torchao_config(mode))
        elif mode != "none":
            raise ValueError(f"bench_update quantizes with torchao only (int8, fp8), not {mode!r}")


def build_trainer(case: Case, device: torch.device, run_dir: Path) -> Trainer:
    config = case_config(case, device)
    dtype = inference_dtype(config.mixed_precision)
    pipeline = build_pipeline(case.arch, device, dtype)
    model = family_of(pipeline)
    quantize_in_memory(model, config)
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


def start_measuring_memory(device: torch.device, cap_gib: float | None) -> float:
    """Forget the build's peak (the 24 GB cases build in bf16 and quantize after) and from now on cap the process's
    CUDA memory at `cap_gib` as on a smaller card; returns the GiB resident now (weights, LoRA, optimizer-free)."""
    if device.type != "cuda":
        return rss_kib("VmRSS") / 2**20
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    if cap_gib is not None:
        index = torch.cuda.current_device() if device.index is None else device.index  # the call needs an index
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), index)
    return torch.cuda.memory_allocated(device) / 2**30


def measure(name: str, device: torch.device, warmup: int, iters: int, cap_gib: float | None = None) -> dict:
    """Median seconds per update and the peak memory over `warmup + iters` updates."""
    case = CASES[name]
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        trainer = build_trainer(case, device, Path(run_dir))
        built = time.perf_counter() - started
        resident_gib = start_measuring_memory(device, cap_gib)
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
        "quantize": [config.pretrained.quantize, config.pretrained.quantize_text_encoders],
        "quantized_denoiser_layers": quantized_layers(trainer.denoiser),
        "seconds_per_update": statistics.median(seconds),
        "resident_gib_before_updates": resident_gib,
        "peak_gib": peak_bytes(device) / 2**30,
        "build_seconds": built,
        "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled(),  # off since the FLUX failure (alignprop/session.py)
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument(
        "--memory-cap-gb", type=float, default=None, help="cap this process's CUDA memory (GB read as GiB)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    try:
        result = measure(args.case, device, args.warmup, args.iters, args.memory_cap_gb)
    except torch.OutOfMemoryError as error:
        result = {"case": args.case, "out_of_memory": str(error).splitlines()[0][:300], "cap_gib": args.memory_cap_gb}
    result["memory_cap_gib"] = args.memory_cap_gb
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
