"""A quantized frozen base (QLoRA-style): the denoiser's (and optionally the text encoders') weights stored in 8 or 4
bits at load, the trainable LoRA in fp32 on top.

The reward's gradient only has to flow *through* the frozen layers: torchao's weight-only int8 / fp8 tensors and
bitsandbytes' NF4 dequantize inside the matmul, which autograd differentiates like any other op, and peft wraps
such layers in its own LoRA classes (`TorchaoLoraLinear`, `bnb.Linear4bit`). This is diffusers' recipe for LoRA
training on one consumer GPU (its "FLUX QLoRA" example); we use its quantization configs, never our own kernels.

`pretrained.quantize` / `pretrained.quantize_text_encoders`:
- "int8": torchao int8 weight-only (per-channel scales): 1 byte per weight; runs on CPUs too (the tests use it).
- "fp8": torchao float8 (e4m3) weight-only: 1 byte per weight; faster matmuls need an Ada/Hopper GPU.
- "nf4": bitsandbytes 4-bit NormalFloat with bf16 compute: about 0.5 byte per weight; CUDA only.
"""

from __future__ import annotations

import importlib.util

import torch

from alignprop.errors import UserError

TORCHAO_MODES = ("int8", "fp8")
# The version tried here (torch 2.14.1); 0.15 and older are refused by peft's LoRA-on-torchao check.
TORCHAO_REQUIREMENT = "torchao==0.18.0"


def requested(config) -> tuple[str, str]:
    """(denoiser mode, text-encoder mode) of a config."""
    pretrained = config.pretrained
    return pretrained.get("quantize", "none"), pretrained.get("quantize_text_encoders", "none")


def check(config) -> None:
    """Refuse, in one line and before anything loads, what a quantized base cannot run."""
    modes = requested(config)
    if modes == ("none", "none"):
        return
    keys = [key for key, mode in zip(("quantize", "quantize_text_encoders"), modes, strict=True) if mode != "none"]
    named = " and ".join(f"pretrained.{key}={mode}" for key, mode in zip(keys, [m for m in modes if m != "none"]))
    if modes[0] != "none" and config.train.finetune == "full":
        raise UserError(
            f"{named} with train.finetune=full: quantized weights cannot train (full fine-tuning updates every "
            "denoiser weight); quantize with train.finetune=lora, or drop pretrained.quantize"
        )
    if config.sharding == "fsdp":
        raise UserError(f"{named} with sharding=fsdp: FSDP does not shard quantized weights here; set sharding=none")
    if any(mode in TORCHAO_MODES for mode in modes) and importlib.util.find_spec("torchao") is None:
        raise UserError(f"{named} needs torchao: pip install {TORCHAO_REQUIREMENT}")
    if "nf4" in modes:
        if not torch.cuda.is_available():
            raise UserError(f"{named}: bitsandbytes' NF4 runs on CUDA GPUs only; on this machine use int8")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(f"{named} needs bitsandbytes: pip install bitsandbytes")
    if str(config.pretrained.model).endswith((".safetensors", ".ckpt")) and modes[1] != "none":
        raise UserError(
            "pretrained.quantize_text_encoders with a single-file model: its text encoders come from the file or its "
            "layout; give the model as a diffusers directory or hub id to quantize them"
        )


MODE_NAMES = {
    "int8": "int8 weight-only (torchao)",
    "fp8": "float8 e4m3 weight-only (torchao)",
    "nf4": "4-bit NF4, bf16 compute (bitsandbytes)",
}


def describe(config) -> str:
    """One line for the dry run: what is quantized at load, and how ("" when nothing is)."""
    parts = [
        f"{what}: {MODE_NAMES[mode]}"
        for what, mode in zip(("denoiser", "text encoders"), requested(config), strict=True)
        if mode != "none"
    ]
    return f"quantized at load: {'; '.join(parts)}; LoRA in fp32 on top" if parts else ""


def torchao_config(mode: str):
    """torchao's weight-only config object (diffusers 0.42 rejects the old string names with torchao 0.18)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()


def _library_config(library: str, mode: str):
    """`library`'s (diffusers' or transformers') own quantization config for `mode`; None for "none"."""
    if mode == "none":
        return None
    configs = importlib.import_module(library)  # each library checks that the config is its own class
    if mode == "nf4":
        return configs.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    return configs.TorchAoConfig(torchao_config(mode))


def denoiser_config(mode: str):
    """diffusers' quantization config for a denoiser (UNet / transformer); None for "none"."""
    return _library_config("diffusers", mode)


def text_encoder_config(mode: str):
    """transformers' quantization config for a text encoder (CLIP / T5); None for "none"."""
    return _library_config("transformers", mode)


def pipeline_config(denoiser_name: str, text_encoder_names: tuple[str, ...], denoiser_mode: str, text_mode: str):
    """diffusers' `PipelineQuantizationConfig` mapping each component to its config; None when nothing is
    quantized."""
    mapping = {}
    if denoiser_mode != "none":
        mapping[denoiser_name] = denoiser_config(denoiser_mode)
    if text_mode != "none":
        mapping.update({name: text_encoder_config(text_mode) for name in text_encoder_names})
    if not mapping:
        return None
    from diffusers.quantizers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping=mapping)


def quantized_layers(module: torch.nn.Module) -> int:
    """How many of the module's layers hold quantized weights (torchao tensors, bitsandbytes 4-bit parameters)."""
    kinds = ("Params4bit",)
    if importlib.util.find_spec("torchao") is not None:
        from torchao.utils import TorchAOBaseTensor

        is_torchao = lambda weight: isinstance(weight, TorchAOBaseTensor)  # noqa: E731
    else:
        is_torchao = lambda weight: False  # noqa: E731
    weights = [getattr(layer, "weight", None) for layer in module.modules()]
    return sum(1 for weight in weights if weight is not None and (is_torchao(weight) or type(weight).__name__ in kinds))


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether diffusers / transformers loaded the module with a quantization config."""
    return bool(getattr(module, "is_quantized", False) or getattr(module, "hf_quantizer", None))
