"""The trainable LoRA: add it to the denoiser, save it in diffusers' format.

Reading LoRA files back (checkpoints, soup, evaluation) is `alignprop.lora_files`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from alignprop.errors import UserError
from alignprop.written_files import give_normal_mode, sort_safetensors_metadata


def add_lora(denoiser, rank: int, alpha: float, target_modules) -> list[torch.nn.Parameter]:
    """Add a trainable LoRA adapter (peft) to the denoiser (UNet or transformer); return its parameters (fp32).

    "gaussian" init: A ~ N(0, 1/rank), B = 0, as the original LoRA attention processors did, so the
    adapted denoiser starts equal to the base one (and A gets no gradient on the first step).
    """
    if rank < 1:
        raise UserError(f"lora.rank must be a positive integer, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    try:
        denoiser.add_adapter(config)
    except ValueError as error:
        raise UserError(f"cannot add LoRA to modules {list(target_modules)}: {error}") from None
    cast_training_params(denoiser, dtype=torch.float32)
    return [p for p in denoiser.parameters() if p.requires_grad]


def lora_state_dict(denoiser, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors in diffusers' LoRA format (what `save_lora_weights` writes); `state`: the denoiser's
    state dict to take them from (a sharded denoiser's, gathered), else its own."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, state_dict=state))


def adapter_metadata(denoiser) -> dict:
    """The adapter's LoraConfig as the file header stores it, with every set as a sorted list: diffusers writes a
    set in its iteration order, which changes with PYTHONHASHSEED, and equal weights must give equal bytes."""
    return {
        key: sorted(value) if isinstance(value, set) else value
        for key, value in denoiser.peft_config["default"].to_dict().items()
    }


def save_lora(model, directory: Path, state: dict | None = None) -> None:
    """Write `pytorch_lora_weights.safetensors` in the model family's layout, with the adapter metadata
    (so a reload is exact): its bytes depend only on the weights and the config, its mode is the umask's.
    `model`: an `alignprop.families.Family`; `state` as for `lora_state_dict`."""
    denoiser = model.denoiser
    model.save_lora(directory, lora_state_dict(denoiser, state), adapter_metadata(denoiser))
    file = Path(directory) / LORA_WEIGHT_NAME_SAFE
    sort_safetensors_metadata(file)  # equal weights, equal bytes
    give_normal_mode(file)
