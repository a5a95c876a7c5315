"""Loading a model for AlignProp: the pipeline of its family, frozen weights in the inference dtype.

A model is named by a hub id, a local diffusers directory, a single .safetensors/.ckpt file, or a short
name of ours ("tiny", "toyworld", ...). Every form goes through `load_pipeline`, so the tiny test models
exercise the same code as the real checkpoints. The family (SD1.x/2.x, SDXL, ...) is read from the model
itself (`model_index.json`); see `alignprop.families`. The trainable LoRA is `alignprop.lora`.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError

from alignprop.errors import UserError, excerpt
from alignprop.families import Family, family_class

logger = logging.getLogger(__name__)

INFERENCE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}
# Hub repositories deleted by their owners, and the maintained mirror of the same weights.
RETIRED_MODEL_IDS = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
# Short names of ours -> "module:attribute" (imported only when used): a function returning the model's directory,
# or a dict of such functions by short name (the tiny random test models of each family).
TINY_FAMILIES = "alignprop.tiny_families:TINY_FAMILIES"
SHORT_NAMES = {
    "tiny": "alignprop.tiny:tiny_pipeline_dir",
    "toyworld": "alignprop.toyworld:pipeline_dir",
    **dict.fromkeys(
        ("tiny_sdxl", "tiny_sd2v", "tiny_sd3", "tiny_sd35", "tiny_flux", "tiny_flux_schnell"), TINY_FAMILIES
    ),
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def inference_dtype(mixed_precision: str) -> torch.dtype:
    if mixed_precision not in INFERENCE_DTYPES:
        raise UserError(f"mixed_precision={mixed_precision!r}; choose one of: {', '.join(INFERENCE_DTYPES)}")
    return INFERENCE_DTYPES[mixed_precision]


def check_model_name(model: str) -> None:
    """Cheap checks that need no download: retired hub ids and local paths that do not exist."""
    if model in RETIRED_MODEL_IDS:
        raise UserError(
            f"{model!r} was deleted from the hub by its owner; use the mirror of the same weights: "
            f"--config.pretrained.model={RETIRED_MODEL_IDS[model]}"
        )
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
        raise UserError(f"model path {excerpt(model)} does not exist")


def check_model_available(model: str, revision: str) -> None:
    """Offline (HF_HUB_OFFLINE=1), a hub id must already be in the local cache: say so before any run starts."""
    from huggingface_hub import constants, try_to_load_from_cache

    if model in SHORT_NAMES or Path(model).expanduser().exists() or not constants.is_offline_mode():
        return
    try:
        cached = try_to_load_from_cache(model, "model_index.json", revision=revision)
    except (HFValidationError, ValueError):
        cached = None
    if not isinstance(cached, str):
        raise UserError(
            f"model {excerpt(model)} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it "
            "once online (hf download <id>) or give a local diffusers directory or .safetensors file as "
            "--config.pretrained.model"
        )


def resolve_model_source(model: str) -> str:
    """Map short names to their directory and refuse retired hub ids with the replacement."""
    check_model_name(model)
    if model in SHORT_NAMES:
        module, attribute = SHORT_NAMES[model].split(":")
        directory = getattr(importlib.import_module(module), attribute)
        return str((directory[model] if isinstance(directory, dict) else directory)())
    return model


def pipeline_class_name(source: str, revision: str) -> str:
    """The pipeline class `model_index.json` names (a single file: Stable Diffusion 1.x/2.x)."""
    if Path(source).is_file():
        return Family.pipeline_class.__name__
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(source, revision=revision)["_class_name"]


def _from_source(family: type[Family], source: str, revision: str, dtype: torch.dtype, components: dict):
    common = {"dtype": dtype, **family.load_kwargs, **components}
    path = Path(source)
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"{source!r} is a file but not a {' or '.join(SINGLE_FILE_SUFFIXES)} checkpoint")
        return family.pipeline_class.from_single_file(str(path), **common)
    return family.pipeline_class.from_pretrained(source, revision=revision, **common)


def load_pipeline(model: str, revision: str = "main", dtype: torch.dtype = torch.float32, vae: str = ""):
    """Load the model's pipeline (its family read from the model), its scheduler and frozen weights in `dtype`;
    `vae`: another AutoencoderKL to use (e.g. an fp16-safe SDXL VAE)."""
    source = resolve_model_source(model)
    try:
        family = family_class(pipeline_class_name(source, revision))
        components = {"vae": _load_vae(vae, dtype)} if vae else {}
        pipeline = _from_source(family, source, revision, dtype, components)
    except (OSError, HFValidationError, ValueError, KeyError, json.JSONDecodeError) as error:
        raise UserError(
            f"cannot load model {excerpt(model)} ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "when offline, point --config.pretrained.model at a local diffusers directory or .safetensors file"
        ) from None
    family(pipeline).prepare()
    return pipeline


def _load_vae(source: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    check_model_name(source)
    return AutoencoderKL.from_pretrained(source, dtype=dtype)


def load_model(model: str, revision: str = "main", dtype: torch.dtype = torch.float32, vae: str = "") -> Family:
    """`load_pipeline`, wrapped in its family (what the sampler and the trainer use)."""
    pipeline = load_pipeline(model, revision, dtype, vae)
    return family_class(type(pipeline).__name__)(pipeline)
