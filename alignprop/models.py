"""Loading Stable Diffusion for AlignProp: the pipeline, frozen weights in the inference dtype, LoRA.

A model is named by a hub id, a local diffusers directory, a single .safetensors/.ckpt file, or a short
name of ours ("tiny"). Every form goes through `load_pipeline`, so the tiny test model exercises the same
code as Stable Diffusion 1.5.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from huggingface_hub.errors import HFValidationError
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from alignprop import tiny
from alignprop.errors import UserError

logger = logging.getLogger(__name__)

INFERENCE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}
# Hub repositories deleted by their owners, and the maintained mirror of the same weights.
RETIRED_MODEL_IDS = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
SHORT_NAMES = {"tiny": tiny.tiny_pipeline_dir}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def inference_dtype(mixed_precision: str) -> torch.dtype:
    if mixed_precision not in INFERENCE_DTYPES:
        raise UserError(f"mixed_precision={mixed_precision!r}; choose one of: {', '.join(INFERENCE_DTYPES)}")
    return INFERENCE_DTYPES[mixed_precision]


def resolve_model_source(model: str) -> str:
    """Map short names to their directory and refuse retired hub ids with the replacement."""
    if model in RETIRED_MODEL_IDS:
        raise UserError(
            f"{model!r} was deleted from the hub by its owner; use the mirror of the same weights: "
            f"--config.pretrained.model={RETIRED_MODEL_IDS[model]}"
        )
    if model in SHORT_NAMES:
        return str(SHORT_NAMES[model]())
    return model


def _from_source(source: str, revision: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    common = {"dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    path = Path(source)
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"{source!r} is a file but not a {' or '.join(SINGLE_FILE_SUFFIXES)} checkpoint")
        return StableDiffusionPipeline.from_single_file(str(path), **common)
    if source.startswith((".", "/")) and not path.is_dir():
        raise UserError(f"model path {source!r} does not exist")
    return StableDiffusionPipeline.from_pretrained(source, revision=revision, **common)


def load_pipeline(model: str, revision: str = "main", dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load a Stable Diffusion 1.x/2.x pipeline with a DDIM scheduler; weights frozen in `dtype`."""
    source = resolve_model_source(model)
    try:
        pipeline = _from_source(source, revision, dtype)
    except (OSError, HFValidationError, ValueError) as error:
        raise UserError(
            f"cannot load model {model!r} ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "when offline, point --config.pretrained.model at a local diffusers directory or .safetensors file"
        ) from None
    # DDIM with the model's own schedule and prediction type (epsilon for SD1.x, v for SD2.x-768).
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    for module in (pipeline.vae, pipeline.text_encoder, pipeline.unet):
        module.requires_grad_(False).eval()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def add_lora(unet, rank: int, alpha: float, target_modules) -> list[torch.nn.Parameter]:
    """Add a trainable LoRA adapter (peft) to the UNet; return its parameters, kept in float32.

    "gaussian" init: A ~ N(0, 1/rank), B = 0, as the original LoRA attention processors did, so the
    adapted UNet starts equal to the base one (and A gets no gradient on the first step).
    """
    if rank < 1:
        raise UserError(f"lora.rank must be a positive integer, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    try:
        unet.add_adapter(config)
    except ValueError as error:
        raise UserError(f"cannot add LoRA to modules {list(target_modules)}: {error}") from None
    cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's tensors in diffusers' LoRA format (what `save_lora_weights` writes)."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet, directory: Path) -> None:
    """Write `pytorch_lora_weights.safetensors` with the adapter metadata, so a reload is exact."""
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=lora_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
