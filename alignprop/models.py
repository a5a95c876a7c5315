"""Loading a model for AlignProp: the pipeline of its family, frozen weights in the inference dtype.

A model is named by a hub id, a local diffusers directory, a single .safetensors/.ckpt file, or a short
name of ours ("tiny", "toyworld", ...). Every form goes through `load_pipeline`, so the tiny test models
exercise the same code as the real checkpoints. The family (SD1.x/2.x, SDXL, ...) is read from the model
itself (`model_index.json`); see `alignprop.families`. The trainable LoRA is `alignprop.lora`.

A single file holds weights only (the original LDM key layout; diffusers converts them). The pipeline's layout
(model_index.json, each component's config, the tokenizer, the scheduler) comes from `pretrained.config`: a local
diffusers directory, a hub id or a short name, read by diffusers' `from_single_file(config=...)` without any
download once it is local or cached. Without it diffusers infers a hub repo from the file's keys and fetches its
configs, which offline works only when that repo is already cached (`single_file_layout`).
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError

from alignprop import quantization
from alignprop.errors import UserError, excerpt, first_line
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
    "toyworld_flow": "alignprop.toyworld:flow_pipeline_dir",
    **dict.fromkeys(
        ("tiny_sdxl", "tiny_sd2v", "tiny_sd3", "tiny_sd35", "tiny_flux", "tiny_flux_schnell"), TINY_FAMILIES
    ),
}
# The family of each short name's model (as model_index.json names it once built), for what is said before loading.
SHORT_NAME_FAMILIES = {
    **dict.fromkeys(("tiny", "toyworld", "tiny_sd2v"), "sd"),
    "tiny_sdxl": "sdxl",
    **dict.fromkeys(("toyworld_flow", "tiny_sd3", "tiny_sd35"), "sd3"),
    **dict.fromkeys(("tiny_flux", "tiny_flux_schnell"), "flux"),
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
NOT_QUANTIZED = ("none", "none")  # (denoiser, text encoders): see alignprop.quantization
SINGLE_FILE_CONFIG_OPTION = "--config.pretrained.config"
SINGLE_FILE_CONFIG_ALONE = (
    "pretrained.config is the pipeline layout of a single-file pretrained.model (.safetensors or .ckpt); "
    "{model} is not one: drop --config.pretrained.config"
)


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
            f"model {excerpt(model)} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: run "
            "`hf download <id>` once online, or give a local diffusers directory or single file as pretrained.model"
        )


def resolve_model_source(model: str) -> str:
    """Map short names to their directory and refuse retired hub ids with the replacement."""
    check_model_name(model)
    if model in SHORT_NAMES:
        module, attribute = SHORT_NAMES[model].split(":")
        directory = getattr(importlib.import_module(module), attribute)
        return str((directory[model] if isinstance(directory, dict) else directory)())
    return model


def pipeline_class_name(source: str, revision: str, layout: str = "") -> str:
    """The pipeline class `model_index.json` names; a single file: its layout's (without one, Stable Diffusion
    1.x/2.x, as diffusers assumes)."""
    if Path(source).is_file():
        if not layout:
            return Family.pipeline_class.__name__
        source = layout
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(source, revision=revision)["_class_name"]


def _cached(repo: str, filename: str, revision: str | None) -> Path | None:
    """The file from the local hub cache (never the network), None when it is not there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename, revision=revision)
    except (HFValidationError, ValueError):
        return None
    return Path(found) if isinstance(found, str) else None


class _Shapes(Mapping):
    """A .safetensors file's tensors as empty meta tensors of their shapes (read from the header, no weights)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            self._shapes = {key: file.get_slice(key).get_shape() for key in file.keys()}

    def __getitem__(self, key):
        return torch.empty(self._shapes[key], device="meta")

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self):
        return len(self._shapes)


def inferred_layout(path: Path) -> str | None:
    """The hub repo whose configs diffusers fetches for a single file given without a layout (None: unknown),
    guessed from the file's keys and shapes as diffusers does, without reading the weights of a .safetensors."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    try:
        if path.suffix == ".safetensors":
            checkpoint = _Shapes(path)
        else:  # a zip-format torch checkpoint is mapped, not read
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            while isinstance(checkpoint, dict) and "state_dict" in checkpoint:
                checkpoint = checkpoint["state_dict"]
        return fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    except Exception:  # not readable this way: diffusers will say what it can when it loads the file
        return None


def single_file_layout(model: str, path: Path, layout: str, revision: str) -> str:
    """`pretrained.config` for a single-file model, as diffusers' `from_single_file(config=)` takes it: a local
    diffusers directory (short names resolved) or a hub id; "" for diffusers' own guess. UserError (one line) for a
    layout that cannot be read, and, offline, for one that is not cached or a file given without one."""
    from huggingface_hub import constants

    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise UserError(f"{excerpt(model)} is a file but not a {' or '.join(SINGLE_FILE_SUFFIXES)} checkpoint")
    offline = constants.is_offline_mode()
    if not layout:
        repo = inferred_layout(path) if offline else None
        if offline and (repo is None or _cached(repo, "model_index.json", revision) is None):
            raise UserError(
                f"single-file model {excerpt(model)} needs a pipeline layout and HF_HUB_OFFLINE is set"
                f"{f' ({repo} is not cached)' if repo else ''}: give a diffusers directory of its family as "
                f"{SINGLE_FILE_CONFIG_OPTION}=DIR"
            )
        return ""
    if layout.startswith((".", "/", "~")) and not Path(layout).expanduser().exists():
        raise UserError(f"pretrained.config path {excerpt(layout)} does not exist")
    if layout in RETIRED_MODEL_IDS:
        raise UserError(
            f"{layout!r} was deleted from the hub by its owner; use the mirror of the same configs: "
            f"{SINGLE_FILE_CONFIG_OPTION}={RETIRED_MODEL_IDS[layout]}"
        )
    source = resolve_model_source(layout)
    directory = Path(source).expanduser()
    if directory.exists():
        if not (directory / "model_index.json").is_file():
            raise UserError(
                f"pretrained.config {excerpt(layout)} is not a diffusers pipeline directory (no model_index.json); "
                "give one holding model_index.json and its components' configs"
            )
        return str(directory)
    index = _cached(source, "model_index.json", revision)
    if index is not None:  # the cached snapshot: diffusers reads it as a local directory, no hub call at all
        return str(index.parent)
    if offline:
        raise UserError(
            f"pretrained.config {excerpt(layout)} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "download its configs once online (hf download <id> --include '*.json' --include '*.txt') or give a "
            "local directory"
        )
    return source  # online: diffusers downloads its configs (json and txt files only)


def _from_source(
    family: type[Family],
    source: str,
    revision: str,
    dtype: torch.dtype,
    components: dict,
    layout: str = "",
    quantize: tuple[str, str] = NOT_QUANTIZED,
):
    common = {"dtype": dtype, **family.load_kwargs, **components}
    if Path(source).is_file():
        where = {"config": layout, "revision": revision} if layout else {}
        if quantize[0] != "none":  # diffusers quantizes single files per model, not per pipeline
            common[family.denoiser_name] = _quantized_single_file_denoiser(family, source, where, dtype, quantize[0])
        return family.pipeline_class.from_single_file(source, **where, **common)
    plan = quantization.pipeline_config(family.denoiser_name, family.text_encoder_names, *quantize)
    if plan is not None:
        common["quantization_config"] = plan
    return family.pipeline_class.from_pretrained(source, revision=revision, **common)


def _quantized_single_file_denoiser(family: type[Family], source: str, where: dict, dtype: torch.dtype, mode: str):
    """The denoiser of a single-file model, quantized at load (the pipeline then takes it as a component)."""
    (denoiser_class,) = family.pipeline_class._get_signature_types()[family.denoiser_name]
    quantized = quantization.denoiser_config(mode)
    return denoiser_class.from_single_file(
        source, subfolder=family.denoiser_name, torch_dtype=dtype, quantization_config=quantized, **where
    )


def load_pipeline(
    model: str,
    revision: str = "main",
    dtype: torch.dtype = torch.float32,
    vae: str = "",
    single_file_config: str = "",
    quantize: tuple[str, str] = NOT_QUANTIZED,
):
    """Load the model's pipeline (its family read from the model), its scheduler and frozen weights in `dtype`;
    `vae`: another AutoencoderKL to use (e.g. an fp16-safe SDXL VAE); `single_file_config`: the pipeline layout of
    a single-file model (`pretrained.config`, see `single_file_layout`); `quantize`: the (denoiser, text encoders)
    storage modes of `pretrained.quantize*` (`alignprop.quantization`)."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    source = resolve_model_source(model)
    single_file = Path(source).expanduser().is_file()
    if single_file_config and not single_file:
        raise UserError(SINGLE_FILE_CONFIG_ALONE.format(model=excerpt(model)))
    if single_file:
        source = str(Path(source).expanduser())
    layout = single_file_layout(model, Path(source), single_file_config, revision) if single_file else ""
    try:
        family = family_class(pipeline_class_name(source, revision, layout))
        components = {"vae": _load_vae(vae, dtype)} if vae else {}
        pipeline = _from_source(family, source, revision, dtype, components, layout, quantize)
    except (OSError, HFValidationError, ValueError, KeyError, json.JSONDecodeError, SingleFileComponentError) as error:
        if single_file and single_file_config and isinstance(error, OSError):
            hint = "pretrained.config needs model_index.json and each component's config (*.json, *.txt files)"
        elif single_file and single_file_config:
            hint = "pretrained.config must be a pipeline of the file's family and size"
        elif single_file:
            hint = f"give a diffusers directory of its family as {SINGLE_FILE_CONFIG_OPTION}=DIR"
        else:
            hint = "when offline, point --config.pretrained.model at a local diffusers directory"
        raise UserError(f"cannot load model {excerpt(model)} ({first_line(error)}); {hint}") from None
    family(pipeline).prepare()
    return pipeline


def _load_vae(source: str, dtype: torch.dtype):
    """`pretrained.vae`: its own one line when it cannot load (the model itself may be fine)."""
    from diffusers import AutoencoderKL

    check_model_name(source)
    try:
        return AutoencoderKL.from_pretrained(source, dtype=dtype)
    except (OSError, HFValidationError, ValueError, KeyError, json.JSONDecodeError) as error:
        raise UserError(
            f"cannot load pretrained.vae {excerpt(source)} ({first_line(error, 80)}); give a hub id (cached when "
            "offline) or a local AutoencoderKL directory, or leave it empty"
        ) from None


def load_model(
    model: str,
    revision: str = "main",
    dtype: torch.dtype = torch.float32,
    vae: str = "",
    single_file_config: str = "",
    quantize: tuple[str, str] = NOT_QUANTIZED,
) -> Family:
    """`load_pipeline`, wrapped in its family (what the sampler and the trainer use)."""
    pipeline = load_pipeline(model, revision, dtype, vae, single_file_config, quantize)
    return family_class(type(pipeline).__name__)(pipeline)
