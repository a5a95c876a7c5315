"""Step-time and memory benchmark: our AlignProp training step against the original algorithm.

A *training step* is what `Trainer.train_update` does for one micro-batch: encode the
prompts, draw latents, run T DDIM steps with gradient per the truncation plan, decode with the VAE, score
with a reward, backpropagate, clip the gradient norm, AdamW step. Every variant runs it on the same
modules, prompts, latents and truncation plans (one seeded plan per iteration, shared by all variants,
iterations interleaved across variants); only the sampler and its options differ:

- `reference`: `alignprop.reference.reference_sample`, a plain transcription of the original loop (two
  UNet calls per step for CFG, autograd on everywhere, every call checkpointed, outputs `.detach()`ed per
  the plan), under autocast as the original ran;
- `ours` and its option variants (`VARIANTS`): `alignprop.sampling.sample` + `decode`.

Forward-equivalents (fe) count a step's UNet work in units of one batched CFG UNet forward (batch 2B):

    the UNet forward of every DDIM step (no-grad or recording)   1
        (the reference's two half-batch calls count 1 together: same arithmetic)
    recomputing a checkpointed call during backward              1
    backward through a call that keeps its gradient              2   (the usual input + weight grads count)
    a detached call beyond its forward                           0

so K kept steps of T cost T + 3K fe with checkpointing and T + 2K without (K=1, T=50: 53 / 52). VAE,
text encoder, reward, scheduler arithmetic and optimizer are not counted: they are the overhead that
`efficiency` exposes. With frozen base weights a real backward costs less than 2 forwards (no weight
grads except LoRA's); `forward_backward_fe` in the output is the measured cost of one batched
forward + backward, for judging that convention.

    efficiency = median step time / (fe x t_fwd)

t_fwd: median time of one batched no-grad UNet forward (`guided_prediction`, batch 2B, LoRA attached), measured
in the same process with the variant's precision, memory format and compilation. Peak memory: CUDA max allocated
during the step (weights included); on the CPU the process's peak RSS during the step (VmHWM, reset
before each step where Linux allows it).

Examples (from the repository root; results and the GPU script: benchmarks/README.md):
    python -m benchmarks.bench_step --arch tiny --json bench-cpu.json
    python -m benchmarks.bench_step --arch sd15 --device cuda --dtype bf16 --batch-size 4 --full-batch-size 1
    python -m benchmarks.bench_step --arch sd15 --run fixed@4:ours,ours-compile --run full@1:ours,reference
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import resource
import statistics
import sys
import time
from argparse import RawDescriptionHelpFormatter as Raw
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from ml_collections import ConfigDict
from torch.utils.flop_counter import FlopCounterMode

from alignprop.families import family_of
from alignprop.lora import add_lora
from alignprop.prefix import prefix_length, run_prefixes
from alignprop.reference import reference_sample
from alignprop.rewards import build_reward
from alignprop.sampling import SamplingOptions, decode, guided_prediction, initial_latents, sample
from alignprop.truncation import STRATEGIES, Truncation
from benchmarks.architectures import ARCHITECTURES, build_pipeline

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_FREE_REWARDS = ("colorfulness", "compressibility")
PROMPTS = ("cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
GUIDANCE = 7.5


@dataclass(frozen=True)
class Variant:
    """One way to run the step. Option fields are the keyword arguments of sample/decode/load_pipeline."""

    name: str
    reference: bool = False
    grad_checkpoint: bool = True
    decode_checkpoint: bool = False
    native_dtype: bool = False
    channels_last: bool = False
    cudnn_benchmark: bool = False
    compile_mode: str = ""  # compile_denoiser: "" off, else a torch.compile mode ("default", ...)
    no_grad_batch: int = 0  # train.no_grad_batch_size: 0 off, -1 all the samples of the update
    description: str = ""


VARIANTS = {
    v.name: v
    for v in (
        Variant("reference", reference=True, description="original loop: 2 UNet calls/step, autograd everywhere"),
        Variant("ours", description="defaults of the training config"),
        Variant("ours-no-ckpt", grad_checkpoint=False, description="no UNet checkpointing"),
        Variant("ours-decode-ckpt", decode_checkpoint=True, description="VAE decode checkpointed"),
        Variant("ours-native", native_dtype=True, description="UNet/VAE in bf16/fp16 with autocast off"),
        Variant("ours-channels-last", channels_last=True, description="NHWC conv weights"),
        Variant("ours-native-cl", native_dtype=True, channels_last=True, description="native + channels_last"),
        Variant("ours-native-no-ckpt", native_dtype=True, grad_checkpoint=False, description="native, no ckpt"),
        Variant("ours-cudnn-bench", cudnn_benchmark=True, description="torch.backends.cudnn.benchmark on"),
        Variant("ours-compile", compile_mode="default", description="torch.compile'd denoiser for no-grad calls"),
        Variant("ours-graphs", compile_mode="reduce-overhead", description="compiled + CUDA graphs (no-grad calls)"),
        Variant("ours-prefix", no_grad_batch=-1, description="no-grad prefixes of the whole update in one batch"),
        Variant("ours-prefix-compile", no_grad_batch=-1, compile_mode="default", description="prefix + compile"),
        Variant("ours-prefix-graphs", no_grad_batch=-1, compile_mode="reduce-overhead", description="prefix + graphs"),
    )
}


@dataclass(frozen=True)
class Run:
    """Variants timed side by side (interleaved) on one strategy and batch size."""

    strategy: str
    batch: int
    variants: tuple[str, ...]

    @classmethod
    def parse(cls, spec: str, default_batch: int) -> Run:
        """`STRATEGY[@BATCH]:VARIANT[,VARIANT...]`, e.g. `full@1:ours,reference`."""
        head, _, variants = spec.partition(":")
        strategy, _, batch = head.partition("@")
        return cls(strategy, int(batch) if batch else default_batch, tuple(v for v in variants.split(",") if v))


# --- setup ---------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """Everything the variants share: modules, LoRA parameters, reward, precision."""

    pipeline: object
    params: list[torch.nn.Parameter]
    reward: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    steps: int
    model: object  # the pipeline's family (`alignprop.families`), holding the compiled denoiser while a variant runs
    forward_ms: dict[str, float] = field(default_factory=dict)  # cache: forward timing key -> ms
    compiled: dict[str, torch.nn.Module] = field(default_factory=dict)  # compile mode -> compiled denoiser

    def compiled_denoiser(self, mode: str) -> torch.nn.Module:
        """One compiled denoiser per mode for the whole benchmark (compiled at its first call, in the warm-up)."""
        if mode not in self.compiled:
            self.model.compile_denoiser(mode)
            self.compiled[mode] = self.model.compiled_denoiser
        return self.compiled[mode]

    @property
    def unet(self):
        return self.model.denoiser

    def autocast(self):
        """Mixed precision as the Trainer runs it (accelerate's autocast); off in float32."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def make_bench(args) -> Bench:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    pipeline = build_pipeline(args.arch, device, dtype)
    params = add_lora(family_of(pipeline).denoiser, rank=4, alpha=4, target_modules=LORA_TARGETS)
    reward = build_reward(ConfigDict({"reward_fn": args.reward}), device, dtype)
    return Bench(pipeline, params, reward, device, dtype, args.steps, family_of(pipeline))


def truncation(strategy: str, steps: int) -> Truncation:
    """The strategy at `steps` DDIM steps: fixed = K=1, ranges over the whole chain, gaussian rescaled."""
    if strategy == "fixed":
        return Truncation("fixed", steps, cut=steps - 1)
    if strategy == "gaussian":  # the 2024 default N(42, 5) at T=50, scaled to T
        return Truncation("gaussian", steps, gaussian_mean=0.84 * steps, gaussian_std=0.1 * steps)
    return Truncation(strategy, steps, minmax=(0, steps))


def draw_plans(strategy: str, steps: int, count: int, seed: int) -> list[tuple[bool, ...]]:
    generator = torch.Generator().manual_seed(seed)
    return [truncation(strategy, steps).draw(generator) for _ in range(count)]


def forward_equivalents(plan, grad_checkpoint: bool) -> int:
    """UNet work of one step in batched forwards (convention in the module docstring)."""
    kept = sum(plan)
    return len(plan) + kept * (3 if grad_checkpoint else 2)


# --- measuring -----------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_kib(field_name: str) -> int:
    match = re.search(rf"{field_name}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(match.group(1))


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a region (bytes): CUDA max allocated, or the process's peak RSS on the CPU.

    `base` is what was in use when the region began (weights, caches), so `peak - base` is what the
    region itself added.
    """

    def __init__(self, device: torch.device):
        self.device, self.base, self.peak, self.isolated = device, 0, 0, True

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.isolated = reset_peak_rss()
            self.base = rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.isolated:
            self.peak = rss_kib("VmHWM") * 1024
        else:  # ru_maxrss: the peak of the whole process so far, not of this region alone
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(device: torch.device, function) -> float:
    """Seconds taken by function(), device work included."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def variant_settings(bench: Bench, variant: Variant):
    """Apply the variant's weight layout and cuDNN mode for its runs only."""
    if variant.channels_last:
        set_memory_format(bench.pipeline, torch.channels_last)
    torch.backends.cudnn.benchmark = variant.cudnn_benchmark
    bench.model.compiled_denoiser = bench.compiled_denoiser(variant.compile_mode) if variant.compile_mode else None
    try:
        yield
    finally:
        bench.model.compiled_denoiser = None
        torch.backends.cudnn.benchmark = False
        if variant.channels_last:
            set_memory_format(bench.pipeline, torch.contiguous_format)


def set_memory_format(pipeline, memory_format: torch.memory_format) -> None:
    """NHWC (channels_last) or NCHW 4-D weights for the UNet and the VAE; convolutions follow the weights."""
    for module in (pipeline.unet, pipeline.vae):
        module.to(memory_format=memory_format)


def batched_inputs(bench: Bench, batch: int):
    generator = torch.Generator().manual_seed(1)
    latents = initial_latents(batch, bench.model, generator, bench.device)
    conditioning = bench.model.encode([PROMPTS[i % len(PROMPTS)] for i in range(batch)])
    timestep = torch.tensor(500, device=bench.device)
    return latents, conditioning, timestep


def unet_forward_ms(bench: Bench, batch: int, variant: Variant, repeats: int) -> float:
    """Median ms of one batched CFG UNet forward without gradient, in the variant's precision/layout."""
    key = f"b{batch}" + "".join(
        suffix
        for suffix, on in (
            ("-native", variant.native_dtype),
            ("-cl", variant.channels_last),
            ("-cudnnbench", variant.cudnn_benchmark),
            (f"-compile-{variant.compile_mode}", bool(variant.compile_mode)),
        )
        if on
    )
    if key not in bench.forward_ms:
        latents, conditioning, timestep = batched_inputs(bench, batch)

        def forward():
            options = SamplingOptions(1, GUIDANCE, grad_checkpoint=False, native_dtype=variant.native_dtype)
            guided_prediction(bench.model, latents, timestep, conditioning, options)

        with variant_settings(bench, variant), torch.no_grad(), bench.autocast():
            forward()  # warm-up: kernel selection, allocator
            times = [timed(bench.device, forward) for _ in range(repeats)]
        bench.forward_ms[key] = 1000 * statistics.median(times)
    return bench.forward_ms[key]


def unet_forward_flops(bench: Bench, batch: int) -> float:
    """FLOPs of one batched no-grad CFG denoiser forward (`torch.utils.flop_counter`: matmuls and convolutions)."""
    latents, conditioning, timestep = batched_inputs(bench, batch)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), bench.autocast(), counter:
        guided_prediction(bench.model, latents, timestep, conditioning, SamplingOptions(1, GUIDANCE))
    return float(counter.get_total_flops())


def add_flop_efficiency(rows: list[dict], bench: Bench, peak_tflops: float) -> None:
    """The FLOP limit of each update (fe x forward FLOPs at `peak_tflops` dense throughput) and measured / limit."""
    flops = {}
    for row in rows:
        if row["batch"] not in flops:
            flops[row["batch"]] = unet_forward_flops(bench, row["batch"])
        limit_ms = 1000 * row["forward_equivalents"] * flops[row["batch"]] / (peak_tflops * 1e12)
        row["unet_forward_tflop"] = flops[row["batch"]] / 1e12
        row["flop_limit_ms"] = limit_ms
        row["flop_efficiency"] = row["step_ms_median"] / limit_ms  # 1.0: arithmetic-bound at peak throughput


def forward_backward_fe(bench: Bench, batch: int, repeats: int) -> float:
    """Cost of one recording batched forward + backward into LoRA, in no-grad forwards (convention: 3)."""
    latents, conditioning, timestep = batched_inputs(bench, batch)

    def forward_backward():
        with bench.autocast():
            options = SamplingOptions(1, GUIDANCE, grad_checkpoint=False)
            noise = guided_prediction(bench.model, latents, timestep, conditioning, options)
        noise.float().square().mean().backward()

    forward_backward()
    milliseconds = 1000 * statistics.median(timed(bench.device, forward_backward) for _ in range(repeats))
    for param in bench.params:
        param.grad = None
    return milliseconds / unet_forward_ms(bench, batch, VARIANTS["ours"], repeats)


def text_encode_ms(bench: Bench, batch: int, repeats: int) -> float:
    """What caching the prompt embeddings could save per step at most."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

    def encode():
        with bench.autocast():
            bench.model.encode(prompts)

    encode()
    return 1000 * statistics.median(timed(bench.device, encode) for _ in range(repeats))


# --- one training step ---------------------------------------------------------------------------------


def micro_batch_inputs(bench: Bench, batch: int, seed: int):
    """The prompts and starting latents of the micro-batch with this seed."""
    prompts = [PROMPTS[(seed + i) % len(PROMPTS)] for i in range(batch)]
    return prompts, initial_latents(batch, bench.model, torch.Generator().manual_seed(seed), bench.device)


def sampling_options(variant: Variant, steps: int) -> SamplingOptions:
    return SamplingOptions(
        steps,
        GUIDANCE,
        grad_checkpoint=variant.grad_checkpoint,
        decode_checkpoint=variant.decode_checkpoint,
        native_dtype=variant.native_dtype,
    )


def advance_prefixes(bench: Bench, variant: Variant, inputs, plans) -> list[tuple[torch.Tensor, int]]:
    """As `Trainer.advance_prefixes`: every sample's gradient-free prefix in no-grad chunks; (latents, start) each."""
    prompts = [prompt for micro_prompts, _ in inputs for prompt in micro_prompts]
    lengths = [prefix_length(plan) for (micro_prompts, _), plan in zip(inputs, plans) for _ in micro_prompts]
    chunk = len(prompts) if variant.no_grad_batch < 0 else variant.no_grad_batch
    options = sampling_options(variant, len(plans[0]))
    with bench.autocast():
        conditioning = bench.model.encode(prompts)
        latents = torch.cat([latents for _, latents in inputs])
        advanced = run_prefixes(bench.model, conditioning, latents, lengths, options, chunk)
    parts = advanced.split([len(micro_prompts) for micro_prompts, _ in inputs])
    return [(part, prefix_length(plan)) for part, plan in zip(parts, plans)]


def training_update(bench: Bench, variant: Variant, optimizer, plans, batch: int, seed: int) -> float:
    """One full optimizer update of len(plans) micro-batches (as Trainer.train_update); returns the mean loss.
    Micro-batch m draws its prompts and latents from seed + 7919 m (one micro-batch: today's training step)."""
    model, accumulation = bench.model, len(plans)
    inputs = [micro_batch_inputs(bench, batch, seed + 7919 * m) for m in range(accumulation)]
    starts = [(latents, 0) for _, latents in inputs]
    if variant.no_grad_batch:
        starts = advance_prefixes(bench, variant, inputs, plans)
    losses = []
    for (prompts, _), (latents, start), plan in zip(inputs, starts, plans):
        with bench.autocast():
            conditioning = model.encode(prompts)
            if variant.reference:
                final = reference_sample(model, conditioning, latents, plan, GUIDANCE)
            else:
                final = sample(model, conditioning, latents, plan, sampling_options(variant, len(plan)), start=start)
            images = decode(model, final, None if variant.reference else sampling_options(variant, len(plan)))
            result = bench.reward.score(images, prompts)
        loss = result.loss.float().mean()
        if loss.requires_grad:  # False only when the plan kept no step
            (loss / accumulation).backward()
        losses.append(loss.item())
    torch.nn.utils.clip_grad_norm_(bench.params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return statistics.fmean(losses)


def training_step(bench: Bench, variant: Variant, optimizer, plan, batch: int, seed: int) -> float:
    """One full step (as Trainer.train_update with one micro-batch); returns the loss."""
    return training_update(bench, variant, optimizer, [plan], batch, seed)


@dataclass
class Record:
    """Measurements of one variant on one strategy."""

    strategy: str
    variant: str
    batch: int
    seconds: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    added_bytes: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    fe: list[int] = field(default_factory=list)
    finite_loss: bool = True
    peak_is_per_step: bool = True
    accumulation: int = 1  # micro-batches per timed update (1: a training step)
    first_seconds: float = 0.0  # the first (warm-up) update: with compile_mode, compilation included
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time (robust on shared cores, 1 thread)

    def add(self, seconds: float, memory: PeakMemory, plans, variant: Variant, loss: float, cpu: float = 0.0) -> None:
        """One timed update of len(plans) micro-batches: kept steps per micro-batch, fe of the whole update."""
        self.seconds.append(seconds)
        self.cpu_seconds.append(cpu)
        self.peak_bytes.append(memory.peak)
        self.added_bytes.append(memory.peak - memory.base)
        self.peak_is_per_step &= memory.isolated
        self.kept.append(statistics.fmean(sum(plan) for plan in plans))
        self.fe.append(sum(forward_equivalents(plan, variant.grad_checkpoint) for plan in plans))
        self.finite_loss &= bool(torch.isfinite(torch.tensor(loss)))

    def summary(self, forward_ms: float) -> dict:
        median = statistics.median(self.seconds)
        fe = statistics.fmean(self.fe)
        return {
            "strategy": self.strategy,
            "variant": self.variant,
            "batch": self.batch,
            "accumulation": self.accumulation,
            "step_ms_median": 1000 * median,
            "step_ms_min": 1000 * min(self.seconds),
            "step_ms_max": 1000 * max(self.seconds),
            "step_ms_all": [1000 * s for s in self.seconds],
            "first_ms": 1000 * self.first_seconds,  # warm-up update; minus the median: compile time (compile variants)
            "cpu_ms_median": 1000 * statistics.median(self.cpu_seconds),  # CPU time of the process (all threads)
            "cpu_ms_all": [1000 * s for s in self.cpu_seconds],
            "peak_mib": max(self.peak_bytes) / 2**20,
            "step_added_mib": max(self.added_bytes) / 2**20,  # peak minus what was in use before the step
            "peak_is_per_step": self.peak_is_per_step,  # False: CPU peak RSS of the whole process so far
            "kept_steps_mean": statistics.fmean(self.kept),
            "forward_equivalents": fe,
            "unet_forward_ms": forward_ms,
            "efficiency": 1000 * median / (fe * forward_ms),
            "finite_loss": self.finite_loss,
        }


def measure_step(bench: Bench, variant: Variant, optimizer, plans, batch: int, seed: int):
    """(seconds, PeakMemory, loss, CPU seconds) of one training update of len(plans) micro-batches (1: a training
    step). CPU seconds: the process's CPU time, which other jobs on shared cores do not inflate (1 torch thread)."""
    with variant_settings(bench, variant), PeakMemory(bench.device) as memory:
        synchronize(bench.device)
        start, cpu = time.perf_counter(), time.process_time()
        loss = training_update(bench, variant, optimizer, plans, batch, seed)
        synchronize(bench.device)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, memory, loss, cpu


def run_variants(bench: Bench, run: Run, args) -> list[dict]:
    """Warm-up + timed iterations (updates of args.accumulation micro-batches), interleaved over variants, each
    iteration on its own shared plans (one per micro-batch)."""
    acc = args.accumulation
    drawn = draw_plans(run.strategy, bench.steps, (args.warmup + args.iters) * acc, args.seed)
    updates = [drawn[i : i + acc] for i in range(0, len(drawn), acc)]
    variants = [VARIANTS[name] for name in run.variants]
    optimizers = {v.name: torch.optim.AdamW(bench.params, lr=1e-4) for v in variants}
    records = {v.name: Record(run.strategy, v.name, run.batch, accumulation=acc) for v in variants}
    for iteration, plans in enumerate(updates):
        kept = [sum(plan) for plan in plans]
        for variant in variants:
            optimizer = optimizers[variant.name]
            seed = args.seed + iteration
            seconds, memory, loss, cpu = measure_step(bench, variant, optimizer, plans, run.batch, seed)
            name = f"{run.strategy}@{run.batch}x{acc} {variant.name} #{iteration}"
            log(f"  {name}: {1000 * seconds:.1f} ms (cpu {1000 * cpu:.1f} ms), kept {kept}")
            if iteration == 0:
                records[variant.name].first_seconds = seconds
            if iteration >= args.warmup:
                records[variant.name].add(seconds, memory, plans, variant, loss, cpu)
    return [records[v.name].summary(unet_forward_ms(bench, run.batch, v, args.forward_repeats)) for v in variants]


def add_ratios(rows: list[dict]) -> None:
    """ours / reference step time and peak memory, for rows with a reference on the same strategy."""
    reference = {}
    for row in rows:
        if row["variant"] == "reference":
            reference.setdefault((row["strategy"], row["batch"], row.get("accumulation", 1)), row)
    for row in rows:
        base = reference.get((row["strategy"], row["batch"], row.get("accumulation", 1)))
        row["time_vs_reference"] = row["step_ms_median"] / base["step_ms_median"] if base else None
        # each update against the reference's update on the same plans, timed right next to it (robust to load)
        pairs = [ours / ref for ours, ref in zip(row["step_ms_all"], base["step_ms_all"])] if base else []
        row["time_vs_reference_per_update"] = (
            {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs)} if pairs else None
        )
        row["cpu_vs_reference"] = row["cpu_ms_median"] / base["cpu_ms_median"] if base else None
        row["memory_vs_reference"] = row["peak_mib"] / base["peak_mib"] if base else None


# --- reporting -----------------------------------------------------------------------------------------


def quiet_libraries() -> None:
    """No progress bars or cast-to-dtype notices from the libraries in the benchmark's output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine(device: torch.device) -> dict:
    import diffusers
    import peft
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        cpu_names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        info["cpu"] = cpu_names[0] if cpu_names else info["cpu"]
    return info


def markdown_table(rows: list[dict], memory_label: str) -> str:
    def ratio(value):
        return "" if value is None else f"{value:.2f}x"

    def per_update(value):
        return "" if not value else f"{value['median']:.2f} ({value['min']:.2f}-{value['max']:.2f})"

    lines = [
        f"| strategy | batch | variant | step ms (median) | min-max | {memory_label} (+step) | kept | fe "
        "| UNet fwd ms | efficiency | time vs ref | per update vs ref (min-max) | mem vs ref | cpu ms (median) "
        "| cpu vs ref | first ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        batch = f"{r['batch']}x{r['accumulation']}" if r.get("accumulation", 1) > 1 else r["batch"]  # x: per update
        lines.append(
            f"| {r['strategy']} | {batch} | {r['variant']} | {r['step_ms_median']:.1f} "
            f"| {r['step_ms_min']:.1f}-{r['step_ms_max']:.1f} | {r['peak_mib']:.0f} MiB (+{r['step_added_mib']:.0f}) "
            f"| {r['kept_steps_mean']:.1f} | {r['forward_equivalents']:.1f} | {r['unet_forward_ms']:.2f} "
            f"| {r['efficiency']:.2f} | {ratio(r['time_vs_reference'])} "
            f"| {per_update(r.get('time_vs_reference_per_update'))} | {ratio(r['memory_vs_reference'])} "
            f"| {r.get('cpu_ms_median', 0):.1f} | {ratio(r.get('cpu_vs_reference'))} | {r.get('first_ms', 0):.0f} |"
        )
    return "\n".join(lines)


def table_from_json(path: Path) -> str:
    """The markdown table of a saved run (`--json`), as benchmarks/README.md shows it."""
    report = json.loads(path.read_text())
    cuda = "gpu" in report.get("machine", {})
    return markdown_table(report["results"], "peak CUDA alloc" if cuda else "peak RSS")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__[__doc__.index("Examples") :], formatter_class=Raw
    )
    parser.add_argument("--arch", choices=ARCHITECTURES, default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step (the UNet sees twice that)")
    parser.add_argument("--full-batch-size", type=int, default=None, help="batch for `full` (default: --batch-size)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps T")
    parser.add_argument("--strategies", default="fixed,per_step_uniform,uniform,full", help="comma list")
    parser.add_argument("--variants", default="ours,reference", help=f"comma list of: {', '.join(VARIANTS)}")
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="STRATEGY[@BATCH]:VARIANT[,...]",
        help="explicit runs, in order (repeatable); replaces --strategies x --variants",
    )
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per run and variant")
    parser.add_argument(
        "--accumulation",
        type=int,
        default=1,
        help="micro-batches per timed iteration: >1 times whole optimizer updates (table batch 'BxA'), as needed "
        "for the ours-prefix variants (train.no_grad_batch_size)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--forward-repeats", type=int, default=10, help="timed batched UNet forwards")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="dense bf16 TFLOP/s of the device (H100/H200 SXM: 989): adds flop_limit_ms and flop_efficiency",
    )
    parser.add_argument("--reward", choices=WEIGHT_FREE_REWARDS, default="colorfulness")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default on cpu: 1, the tiny model is overhead-bound and shared cores make "
        "more threads noisy; on cuda: torch's default)",
    )
    parser.add_argument("--table-from", type=Path, default=None, help="print the table of a saved --json run and exit")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here (rewritten after each run)")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.runs = runs_from_args(args)
    for run in args.runs:
        if run.strategy not in STRATEGIES:
            parser.error(f"unknown strategy {run.strategy!r}; choose from {', '.join(STRATEGIES)}")
        for name in run.variants:
            if name not in VARIANTS:
                parser.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return args


def runs_from_args(args) -> list[Run]:
    if args.run:
        return [Run.parse(spec, args.batch_size) for spec in args.run]
    variants = tuple(v for v in args.variants.split(",") if v)
    full_batch = args.full_batch_size or args.batch_size
    return [
        Run(strategy, full_batch if strategy == "full" else args.batch_size, variants)
        for strategy in args.strategies.split(",")
        if strategy
    ]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.table_from:
        print(table_from_json(args.table_from))
        return {}
    quiet_libraries()
    if args.threads or not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads or 1)
    # As the Trainer runs with the default allow_tf32=True (affects the float32 LoRA matmuls).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    bench = make_bench(args)
    report = {
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "runs")},
        "runs": [asdict(run) for run in args.runs],
        "machine": machine(bench.device),
        "variants": {name: asdict(VARIANTS[name]) for run in args.runs for name in run.variants},
        "attention_processors": sorted({type(p).__name__ for p in bench.unet.attn_processors.values()}),
        "setup_s": time.perf_counter() - started,
        "forward_backward_fe": {},
        "text_encode_ms": {},
        "results": [],
    }
    log(f"setup {report['setup_s']:.1f} s on {report['machine'].get('gpu', report['machine']['cpu'])}")
    for batch in sorted({run.batch for run in args.runs}):
        report["forward_backward_fe"][batch] = forward_backward_fe(bench, batch, args.forward_repeats)
        report["text_encode_ms"][batch] = text_encode_ms(bench, batch, args.forward_repeats)
        fwd_bwd = report["forward_backward_fe"][batch]
        log(f"batch {batch}: UNet forward ms {bench.forward_ms}; forward+backward = {fwd_bwd:.2f} fe")
    memory_label = "peak CUDA alloc" if bench.device.type == "cuda" else "peak RSS"
    for run in args.runs:
        report["results"] += run_variants(bench, run, args)
        add_ratios(report["results"])
        if args.peak_tflops:
            add_flop_efficiency(report["results"], bench, args.peak_tflops)
        report["unet_forward_ms"] = bench.forward_ms
        report["table"] = markdown_table(report["results"], memory_label)
        report["total_s"] = time.perf_counter() - started
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    print(report["table"])
    return report


if __name__ == "__main__":
    main()
