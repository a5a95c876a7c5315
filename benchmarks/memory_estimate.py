"""Per-GPU memory of fine-tuning a model family at scale: frozen nets, denoiser weights, gradients, AdamW, EMA.

Activations are NOT included: they depend on the resolution, the batch and the gradient path (truncation K,
checkpointing), and `benchmarks/bench_step.py` measures them. The totals here are what the weights and the
training state need before the first activation, so a budget a total only just stays under leaves no room to run.

    python -m benchmarks.memory_estimate [--arch sd15 sdxl sd35 flux] [--finetune lora full] [--processes 1 8]
        [--sharding none fsdp] [--ema] [--markdown]

Parameter counts come from the real architectures (`benchmarks/architectures.py`: SD1.5, SDXL base 1.0, SD3.5
Medium, FLUX.1-dev), built on the meta device (shapes only, no memory); the tiny test models (`tiny`, `tiny_sdxl`,
`tiny_sd3`, `tiny_flux`) are loaded through the real loader and rebuilt on the meta device from their configs.
LoRA: the rank and target modules of the presets (config/align_prop.py: `hps` for SD1.x, `hps_sdxl`, `hps_sd35`,
`hps_flux`; the tiny models take their family's), counted as peft builds them: r * (in + out) per targeted
nn.Linear (r * in * kh * kw + r * out per nn.Conv2d), the targets matched by peft's own rule.

What is counted, per GPU (GiB = 2**30 bytes; "N" is the process count):
- frozen nets: every pipeline module but the denoiser (text encoders, VAE) in the mixed-precision dtype, bf16,
  replicated on every GPU (never sharded). With `offload_text_encoders` (the SD3.5 / FLUX presets) the text
  encoders leave the GPU after encoding the prompts, leaving the VAE only; that is not modelled here.
- denoiser weights:
  - lora: the frozen base in bf16 (1/N of it under fsdp) + the LoRA parameters in fp32 (1/N under fsdp);
  - full: fp32 master weights (AdamW updates fp32 masters while the forward runs in bf16), 1/N under fsdp;
  - the bf16 compute copy the forward runs on. Without sharding (DDP): a bf16 copy of every trainable parameter,
    as autocast caches it (full: the whole denoiser; lora: the LoRA parameters). Under fsdp: the parameters of
    ONE FSDP unit all-gathered in bf16 at a time -- the largest block (UNet: `down_blocks[i]`, `mid_block`,
    `up_blocks[i]`; SD3: `transformer_blocks[i]`; FLUX: `transformer_blocks[i]` / `single_transformer_blocks[i]`)
    -- plus the root unit (the parameters outside every block: embeddings, norm_out, proj_out), which FSDP keeps
    gathered for the whole step. FSDP's prefetch of the next unit's all-gather (up to one more block) and the
    unsharded gradient of a unit before its reduce-scatter are transient and not counted;
  - the denoiser's buffers (SD3.5's 384x384 positional embedding: 226M values) in the weights' dtype, replicated.
- gradients: fp32, one per trainable parameter (lora: the LoRA parameters; full: the denoiser), 1/N under fsdp.
- optimizer: AdamW's two fp32 moments per trainable parameter, 1/N under fsdp.
- EMA (`--ema`): one fp32 copy of the trainable parameters, 1/N under fsdp.
Sharded sizes are ceil(count / N) elements per process (FSDP's per-tensor padding is ignored). Without sharding
the process count changes nothing (DDP replicates everything). "fits" marks the budgets of 24, 48 and 80 GB the
total stays under, read as GiB; a GPU's usable memory is a little less (the CUDA context, the allocator's slack).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
import time
from dataclasses import dataclass

import torch

from alignprop.sharding import BLOCK_LISTS, SINGLE_BLOCKS, units

REAL_ARCHITECTURES = ("sd15", "sdxl", "sd35", "flux")
TINY_ARCHITECTURES = ("tiny", "tiny_sdxl", "tiny_sd3", "tiny_flux")
FINETUNES = ("lora", "full")
SHARDINGS = ("none", "fsdp")
BUDGETS_GB = (24, 48, 80)
GIB = 2**30
# The preset whose `lora` section an architecture's fine-tuning uses (the tiny models: their family's).
LORA_PRESETS = {
    "sd15": "hps",
    "tiny": "hps",
    "sdxl": "hps_sdxl",
    "tiny_sdxl": "hps_sdxl",
    "sd35": "hps_sd35",
    "tiny_sd3": "hps_sd35",
    "flux": "hps_flux",
    "tiny_flux": "hps_flux",
}
BF16, FP32 = 2, 4  # bytes per element
COLUMNS = ("frozen", "weights", "gradients", "optimizer", "ema", "total")
HEADERS = (
    "model",
    "finetune",
    "processes",
    "sharding",
    "frozen nets",
    "denoiser weights",
    "gradients",
    "optimizer",
    "EMA",
    "total",
    "fits (24/48/80 GB)",
)
CAPTION = (
    "Per-GPU memory in GiB before activations (not included: they depend on resolution, batch and the gradient "
    "path). Frozen nets (text encoders, VAE) bf16, replicated; LoRA: bf16 base + fp32 adapter; full: fp32 masters "
    "+ a bf16 compute copy (the whole denoiser, or under fsdp one gathered block + the root); fp32 gradients, "
    "AdamW (2 fp32 moments) and EMA (1 fp32 copy) of the trainable parameters; fsdp shards all but the frozen nets, "
    "the compute copy and the buffers 1/N."
)


@dataclass(frozen=True)
class Buffers:
    """A module tree's buffers: floating-point elements (stored in the weights' dtype) and other bytes (int ids)."""

    floating: int = 0
    other_bytes: int = 0

    def nbytes(self, floating_bytes: int) -> int:
        return self.floating * floating_bytes + self.other_bytes


@dataclass(frozen=True)
class Unit:
    """One FSDP unit of the denoiser: its name and its parameters (base, and the LoRA the presets add to it)."""

    name: str
    params: int
    lora: int


@dataclass(frozen=True)
class Counts:
    """Parameter counts of one architecture (built on the meta device)."""

    arch: str
    denoiser_name: str
    frozen: dict[str, int]  # component name -> parameters
    frozen_buffers: Buffers
    denoiser: int
    denoiser_buffers: Buffers
    lora_rank: int
    lora_targets: tuple[str, ...]
    lora: int
    root: Unit  # the parameters outside every block
    blocks: tuple[Unit, ...]

    def largest_block(self, finetune: str) -> Unit:
        """The block with the most parameters (lora: base + adapter), the FSDP unit gathered at the peak."""
        size = (lambda unit: unit.params + unit.lora) if finetune == "lora" else (lambda unit: unit.params)
        return max(self.blocks, key=size)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) parameters once, as `parameters()` gives them


def buffer_count(module: torch.nn.Module) -> Buffers:
    buffers = list(module.buffers())
    floating = sum(b.numel() for b in buffers if b.is_floating_point())
    other = sum(b.numel() * b.element_size() for b in buffers if not b.is_floating_point())
    return Buffers(floating, other)


def lora_count(module: torch.nn.Module, rank: int, target_modules, prefix: str = "") -> int:
    """The parameters peft's LoRA of `rank` on `target_modules` adds to `module` (names matched as peft matches them,
    relative to the model LoRA is added to: `prefix` is `module`'s name in it)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(r=rank, target_modules=list(target_modules))
    total = 0
    for name, layer in module.named_modules():
        key = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if not key or not check_target_module_exists(config, key):
            continue
        if isinstance(layer, torch.nn.Linear):
            total += rank * (layer.in_features + layer.out_features)
        elif isinstance(layer, torch.nn.Conv2d):
            total += (
                rank * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size) + rank * layer.out_channels
            )
        else:
            raise TypeError(f"LoRA target {key} is a {type(layer).__name__}; only nn.Linear and nn.Conv2d are counted")
    return total


def split_units(denoiser: torch.nn.Module, rank: int, targets) -> tuple[Unit, tuple[Unit, ...]]:
    """The denoiser's blocks (the FSDP units `sharding=fsdp` makes: `alignprop.sharding.units`) and the root:
    whatever parameters no block holds."""
    blocks = [
        Unit(key, parameter_count(block), lora_count(block, rank, targets, key)) for key, block in units(denoiser)
    ]
    if not blocks:
        raise ValueError(f"{type(denoiser).__name__} has none of the blocks {BLOCK_LISTS + SINGLE_BLOCKS}")
    total, total_lora = parameter_count(denoiser), lora_count(denoiser, rank, targets)
    root = Unit("root", total - sum(b.params for b in blocks), total_lora - sum(b.lora for b in blocks))
    return root, tuple(blocks)


def _rebuild_on_meta(module: torch.nn.Module) -> torch.nn.Module:
    """The same architecture as a loaded module, built from its config on the meta device (shapes only)."""
    from diffusers import ModelMixin

    with torch.device("meta"):
        if isinstance(module, ModelMixin):
            return type(module).from_config(module.config)
        return type(module)(module.config)  # a transformers model


def meta_modules(arch: str) -> tuple[str, dict[str, torch.nn.Module]]:
    """(the denoiser's component name, every nn.Module component of the pipeline) of `arch`, on the meta device."""
    from alignprop.families import family_of
    from benchmarks.architectures import build_pipeline

    if arch in REAL_ARCHITECTURES:
        # The whole builder under the meta device: a module it builds outside its own device context is meta too.
        with torch.device("meta"):
            pipeline = build_pipeline(arch, torch.device("meta"), torch.bfloat16)
        modules = {name: m for name, m in pipeline.components.items() if isinstance(m, torch.nn.Module)}
    elif arch in TINY_ARCHITECTURES:
        pipeline = build_pipeline(arch, torch.device("cpu"), torch.float32)  # the real loader, tiny real weights
        modules = {
            name: _rebuild_on_meta(m) for name, m in pipeline.components.items() if isinstance(m, torch.nn.Module)
        }
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(LORA_PRESETS)}")
    return family_of(pipeline).denoiser_name, modules


@functools.cache
def counts(arch: str) -> Counts:
    """Parameter counts of `arch` and of its presets' LoRA."""
    from alignprop.presets import load_preset

    lora_config = load_preset(LORA_PRESETS[arch]).lora
    rank, targets = int(lora_config.rank), tuple(lora_config.target_modules)
    denoiser_name, modules = meta_modules(arch)
    denoiser = modules.pop(denoiser_name)
    frozen_buffers = [buffer_count(m) for m in modules.values()]
    root, blocks = split_units(denoiser, rank, targets)
    return Counts(
        arch=arch,
        denoiser_name=denoiser_name,
        frozen={name: parameter_count(m) for name, m in modules.items()},
        frozen_buffers=Buffers(sum(b.floating for b in frozen_buffers), sum(b.other_bytes for b in frozen_buffers)),
        denoiser=parameter_count(denoiser),
        denoiser_buffers=buffer_count(denoiser),
        lora_rank=rank,
        lora_targets=targets,
        lora=lora_count(denoiser, rank, targets),
        root=root,
        blocks=blocks,
    )


def estimate(arch: str, finetune: str, processes: int, sharding: str, ema: bool = False) -> dict[str, int]:
    """Bytes per GPU: frozen (text encoders, VAE), weights (the denoiser's), gradients, optimizer, ema, total."""
    if finetune not in FINETUNES or sharding not in SHARDINGS or processes < 1:
        raise ValueError(f"finetune {finetune!r}, sharding {sharding!r}, processes {processes}")
    c = counts(arch)
    sharded = sharding == "fsdp"
    share = lambda n: -(-n // processes) if sharded else n  # noqa: E731  ceil(n / N) per process
    lora = finetune == "lora"
    trainable = c.lora if lora else c.denoiser
    frozen_base = c.denoiser if lora else 0
    if sharded:
        unit = c.largest_block(finetune)
        gathered = unit.params + c.root.params + (unit.lora + c.root.lora if lora else 0)
    else:
        gathered = trainable  # autocast's bf16 copy of the fp32 trainable parameters; a frozen base is bf16 already
    weights = (
        BF16 * share(frozen_base)
        + FP32 * share(trainable)
        + BF16 * gathered
        + c.denoiser_buffers.nbytes(BF16 if lora else FP32)
    )
    result = {
        "frozen": BF16 * sum(c.frozen.values()) + c.frozen_buffers.nbytes(BF16),
        "weights": weights,
        "gradients": FP32 * share(trainable),
        "optimizer": 2 * FP32 * share(trainable),
        "ema": FP32 * share(trainable) if ema else 0,
    }
    result["total"] = sum(result.values())
    return result


def fits(total_bytes: int) -> str:
    return "/".join("yes" if total_bytes < budget * GIB else "no" for budget in BUDGETS_GB)


def rows(archs, finetunes, processes, shardings, ema: bool) -> list[tuple[str, ...]]:
    table = []
    for arch, finetune, count, sharding in itertools.product(archs, finetunes, processes, shardings):
        sizes = estimate(arch, finetune, count, sharding, ema)
        gib = {key: f"{value / GIB:.2f}" for key, value in sizes.items()}
        if not ema:
            gib["ema"] = "-"
        table.append((arch, finetune, str(count), sharding, *(gib[key] for key in COLUMNS), fits(sizes["total"])))
    return table


def describe(c: Counts, finetune: str) -> str:
    frozen = ", ".join(f"{name} {n:,}" for name, n in c.frozen.items())
    unit = c.largest_block(finetune)
    buffers = f"; buffers {c.denoiser_buffers.floating:,} values" if c.denoiser_buffers.floating else ""
    return (
        f"{c.arch}: {c.denoiser_name} {c.denoiser:,} parameters{buffers}; frozen nets {sum(c.frozen.values()):,} "
        f"({frozen}); LoRA rank {c.lora_rank} on {', '.join(c.lora_targets)}: {c.lora:,}; largest FSDP unit "
        f"{unit.name} {unit.params:,} (+ LoRA {unit.lora:,}), root {c.root.params:,} (+ LoRA {c.root.lora:,})"
    )


def markdown(table) -> str:
    lines = [f"| {' | '.join(HEADERS)} |", f"|{'|'.join('---' for _ in HEADERS)}|"]
    return "\n".join(lines + [f"| {' | '.join(row)} |" for row in table])


def plain(table) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(HEADERS, *table)]
    numeric = set(range(2, len(HEADERS) - 1))
    cell = lambda i, value: value.rjust(widths[i]) if i in numeric else value.ljust(widths[i])  # noqa: E731
    return "\n".join("  ".join(cell(i, value) for i, value in enumerate(row)).rstrip() for row in (HEADERS, *table))


def report(archs, finetunes, processes, shardings, ema: bool, as_markdown: bool) -> str:
    table = rows(archs, finetunes, processes, shardings, ema)
    notes = [describe(counts(arch), finetunes[0]) for arch in archs]
    if as_markdown:
        return "\n".join([CAPTION, "", markdown(table), "", *(f"- {note}" for note in notes)])
    return "\n".join([CAPTION, "", plain(table), "", *notes])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory_estimate",
        description="Per-GPU memory (GiB) of weights, gradients, AdamW state and EMA; activations not included.",
    )
    parser.add_argument(
        "--arch", nargs="+", choices=REAL_ARCHITECTURES + TINY_ARCHITECTURES, default=REAL_ARCHITECTURES
    )
    parser.add_argument("--finetune", nargs="+", choices=FINETUNES, default=FINETUNES)
    parser.add_argument("--processes", nargs="+", type=int, default=(1, 8), help="processes (GPUs)")
    parser.add_argument("--sharding", nargs="+", choices=SHARDINGS, default=SHARDINGS)
    parser.add_argument("--ema", action="store_true", help="count an fp32 EMA copy of the trainable parameters")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table (default: plain text)")
    args = parser.parse_args(argv)
    if any(count < 1 for count in args.processes):
        parser.error("--processes: each count must be at least 1")
    return args


def quiet() -> None:
    """No loading progress bars (the tiny models) and no casting warnings (the meta builds): the command line only."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    text = report(args.arch, args.finetune, args.processes, args.sharding, args.ema, args.markdown)
    print(text)
    print(f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return text


if __name__ == "__main__":
    quiet()
    main()
