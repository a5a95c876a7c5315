"""Loading Stable Diffusion for AlignProp: the pipeline, frozen weights in the inference dtype, LoRA.

A model is named by a hub id, a local diffusers directory, a single .safetensors/.ckpt file, or a short
name of ours ("tiny"). Every form goes through `load_pipeline`, so the tiny test model exercises the same
code as Stable Diffusion 1.5.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from huggingface_hub.errors import HFValidationError
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from alignprop import tiny, toyworld
from alignprop.errors import UserError

logger = logging.getLogger(__name__)

INFERENCE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}
# Hub repositories deleted by their owners, and the maintained mirror of the same weights.
RETIRED_MODEL_IDS = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
SHORT_NAMES = {"tiny": tiny.tiny_pipeline_dir, "toyworld": toyworld.pipeline_dir}
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
        raise UserError(f"model path {model!r} does not exist")


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
            f"model {model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it once "
            f"online (hf download {model}) or give a local diffusers directory or .safetensors file as "
            "--config.pretrained.model"
        )


def resolve_model_source(model: str) -> str:
    """Map short names to their directory and refuse retired hub ids with the replacement."""
    check_model_name(model)
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
    return prepare_pipeline(pipeline)


def prepare_pipeline(pipeline: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """What every pipeline gets, loaded or built in memory: DDIM, frozen eval-mode modules, no progress bars."""
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


class FoldedLoRA:
    """The UNet's LoRA folded into copies of the base weights, for UNet calls that need no LoRA gradient.

    peft computes an adapted Linear as base(x) + scale * B(A(x)): a dozen extra small operators (matmuls,
    views, dtype casts) per projection, ~1500 per SD1.5 UNet call on top of the base ~2400. When the step
    is bound by operator launches (as measured on an H100 at batch 4) that is over a third of the call.
    Inside `applied()`, each adapted layer runs its base Linear on W + scale * B @ A instead (what
    diffusers' `fuse_lora` does for inference); the original weights are swapped back by reference, so
    nothing drifts.

    Numerics: the folded weight is rounded once to the base dtype (bf16/fp16), like a fused LoRA at
    inference; in float32/float64 the result equals the unfolded call up to rounding. Layers with a LoRA
    variant (DoRA, ...) or a LoRA bias are left unfolded (still correct, just not faster).
    Build it when the LoRA weights are final for the call(s), e.g. once per sampling run.
    """

    def __init__(self, unet):
        self.layers, self.weights = [], []
        for layer in unet.modules():
            if isinstance(layer, LoraLayer) and _foldable(layer):
                self.layers.append(layer)
                self.weights.append(_folded_weight(layer))

    @contextlib.contextmanager
    def applied(self):
        """Run the adapted layers as plain Linears on the folded weights (no autograd into LoRA)."""
        originals = [layer.get_base_layer().weight.data for layer in self.layers]
        self._swap_in(self.weights, disable_adapters=True)
        try:
            yield
        finally:
            self._swap_in(originals, disable_adapters=False)

    def _swap_in(self, weights, disable_adapters: bool) -> None:
        for layer, weight in zip(self.layers, weights):
            layer.get_base_layer().weight.data = weight
            layer._disable_adapters = disable_adapters  # peft's own switch: forward = base layer only


def _foldable(layer: LoraLayer) -> bool:
    adapters = [name for name in layer.active_adapters if name in layer.lora_A]
    vanilla = all(name not in layer.lora_variant and not layer.lora_bias.get(name) for name in adapters)
    return bool(adapters) and vanilla and not layer.disable_adapters and not layer.merged


@torch.no_grad()
def _folded_weight(layer: LoraLayer) -> torch.Tensor:
    weight = layer.get_base_layer().weight
    exact = torch.promote_types(weight.dtype, torch.float32)  # add in at least float32, round once
    with torch.autocast(weight.device.type, enabled=False):  # the delta in the adapter's own precision
        deltas = [layer.get_delta_weight(name) for name in layer.active_adapters if name in layer.lora_A]
    return (weight.to(exact) + sum(delta.to(exact) for delta in deltas)).to(weight.dtype)


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
