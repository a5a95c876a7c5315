"""Memory of the one-GPU presets (`hps_sdxl_24gb`, `hps_flux_24gb`) before activations, by how the base is stored.

    python -m benchmarks.memory_one_gpu [--markdown]

An estimate, not a measurement (`benchmarks/gpu_scale.sh` measures the presets on a GPU, capped to 24 GB). From the
real architectures' shapes (`benchmarks/memory_estimate.meta_modules`: built on the meta device, no weights) and the
preset's own settings, for the preset as shipped and for the same preset with its base in bf16 and in NF4:

- a quantized module stores each nn.Linear weight as int8 or fp8 (1 byte + one fp32 scale per output row:
  torchao's weight-only layouts, checked against torchao's own tensors in tests/test_memory_estimate.py) or NF4
  (half a byte + one fp32 absmax per 64 values: bitsandbytes' default block, no double quantization); everything
  else (biases, norms, convolutions, embeddings, buffers) stays bf16;
- the reward: HPS v2.1's open_clip ViT-H-14 (986,109,441 parameters, both towers) in bf16;
- the LoRA (the preset's rank and targets): fp32 weights, gradients and AdamW's two moments, 16 bytes a parameter;
- "at load": every network on the GPU, as while the prompts are encoded; "training": the text encoders moved off
  (`offload_text_encoders`), what stays resident through the updates. Activations come on top of "training".
"""

from __future__ import annotations

import argparse
import math

import torch

from benchmarks.memory_estimate import GIB, counts, meta_modules

BF16 = 2
HPS_V21_PARAMETERS = 986_109_441  # open_clip.create_model("ViT-H-14") on the meta device, image + text towers
PRESETS = {"hps_sdxl_24gb": "sdxl", "hps_flux_24gb": "flux"}
BUDGET_GB = 24
HEADERS = (
    "preset",
    "denoiser stored",
    "text encoders stored",
    "denoiser",
    "text encoders",
    "VAE",
    "reward",
    "LoRA + grads + AdamW",
    "at load",
    "training",
    "training fits 24 GB",
)


def linear_weight_bytes(out_features: int, in_features: int, mode: str) -> int:
    """Bytes of one nn.Linear weight stored as `mode`."""
    values = out_features * in_features
    if mode in ("int8", "fp8"):
        return values + 4 * out_features
    if mode == "nf4":
        return math.ceil(values / 2) + 4 * math.ceil(values / 64)
    return BF16 * values


def stored_bytes(module: torch.nn.Module, mode: str) -> int:
    """Bytes of a module's parameters and buffers with its nn.Linear weights stored as `mode` ("none": all bf16)."""
    total = 0
    for layer in module.modules():
        for name, param in layer.named_parameters(recurse=False):
            if isinstance(layer, torch.nn.Linear) and name == "weight":
                total += linear_weight_bytes(*param.shape, mode)
            else:
                total += BF16 * param.numel()
        total += sum(b.numel() * (BF16 if b.is_floating_point() else b.element_size()) for b in layer.buffers(False))
    return total


def row(preset: str, arch: str, denoiser_mode: str, text_mode: str, modules: dict, denoiser_name: str) -> tuple:
    text_names = [name for name in modules if name.startswith("text_encoder")]
    sizes = {
        "denoiser": stored_bytes(modules[denoiser_name], denoiser_mode),
        "text": sum(stored_bytes(modules[name], text_mode) for name in text_names),
        "vae": stored_bytes(modules["vae"], "none"),
        "reward": BF16 * HPS_V21_PARAMETERS,
        "lora": 16 * counts(arch).lora,
    }
    at_load = sum(sizes.values())
    training = at_load - sizes["text"]
    gib = lambda value: f"{value / GIB:.2f}"  # noqa: E731
    cells = (gib(sizes[key]) for key in ("denoiser", "text", "vae", "reward", "lora"))
    fits = "yes" if training < BUDGET_GB * GIB else "no"
    return (preset, denoiser_mode, text_mode, *cells, gib(at_load), gib(training), fits)


def rows() -> list[tuple]:
    """The shipped preset, then its base in bf16 and in NF4, for each one-GPU preset."""
    from alignprop.presets import load_preset

    table = []
    for preset, arch in PRESETS.items():
        pretrained = load_preset(preset).pretrained
        shipped = (pretrained.quantize, pretrained.quantize_text_encoders)
        denoiser_name, modules = meta_modules(arch)
        for modes in dict.fromkeys([("none", "none"), shipped, ("nf4", "nf4")]):
            table.append(row(preset, arch, *modes, modules, denoiser_name))
    return table


def markdown(table) -> str:
    lines = [f"| {' | '.join(HEADERS)} |", f"|{'|'.join('---' for _ in HEADERS)}|"]
    return "\n".join(lines + [f"| {' | '.join(cells)} |" for cells in table])


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_one_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="a Markdown table (default: tab-separated)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table = rows()
    text = markdown(table) if args.markdown else "\n".join("\t".join(cells) for cells in (HEADERS, *table))
    print(text)
    return text


if __name__ == "__main__":
    from benchmarks.memory_estimate import quiet

    quiet()
    main()
