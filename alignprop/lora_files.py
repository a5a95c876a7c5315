"""LoRA weights on disk in diffusers' format: read them, compare them, put them into a UNet.

The file is what `StableDiffusionPipeline.save_lora_weights` writes (`pytorch_lora_weights.safetensors`,
keys `unet.<module>.lora.down/up.weight`, the peft `LoraConfig` in the header), so the same file loads
into a stock diffusers pipeline with `load_lora_weights(directory)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from alignprop.errors import UserError

LORA_FILE_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' header field for the adapter's LoraConfig
PREFIX = "unet."


@dataclass(frozen=True)
class LoraWeights:
    tensors: dict[str, torch.Tensor]  # diffusers format, keys prefixed with "unet."
    metadata: dict | None  # the LoraConfig fields, keys prefixed with "unet."; None in files from elsewhere
    source: Path

    @property
    def modules(self) -> set[str]:
        """The UNet modules the adapter changes (e.g. `...attn1.to_q`)."""
        return {key.removeprefix(PREFIX).rsplit(".lora.", 1)[0] for key in self.tensors}

    @property
    def ranks(self) -> set[int]:
        return {tensor.shape[0] for key, tensor in self.tensors.items() if key.endswith("lora.down.weight")}

    def config_value(self, name: str):
        return (self.metadata or {}).get(PREFIX + name)

    def unet_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors without the "unet." prefix, in peft's naming (`lora_A` / `lora_B`)."""
        return convert_unet_state_dict_to_peft({k.removeprefix(PREFIX): v for k, v in self.tensors.items()})


def lora_file(path: Path) -> Path:
    """The weights file of a LoRA directory (or the file itself)."""
    return path / LORA_FILE_NAME if path.is_dir() else path


def read_lora(path: Path) -> LoraWeights:
    """Read a diffusers LoRA file safely (safetensors: tensors only, no code); UserError when it is not one."""
    file = lora_file(Path(path))
    if not file.is_file():
        raise UserError(f"no LoRA weights at {str(file)!r} (expected a {LORA_FILE_NAME} file)")
    try:
        tensors = load_file(str(file), device="cpu")
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
        metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else None
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read LoRA weights {str(file)!r}: {error}") from None
    if not tensors or not all(key.startswith(PREFIX) and ".lora." in key for key in tensors):
        raise UserError(f"{str(file)!r} is not a diffusers UNet LoRA (keys like 'unet.<module>.lora.down.weight')")
    return LoraWeights(tensors, metadata, file)


def check_same_layout(a: LoraWeights, b: LoraWeights) -> None:
    """Refuse to mix tensors of adapters that differ in targets, rank or alpha: coef*A + (1-coef)*B is undefined."""
    if a.modules != b.modules:
        only_a, only_b = sorted(a.modules - b.modules), sorted(b.modules - a.modules)
        example = (only_a or only_b)[0]
        raise UserError(
            f"LoRA targets differ: {len(only_a)} modules only in {str(a.source)!r}, {len(only_b)} only in "
            f"{str(b.source)!r} (e.g. {example}); parameter mixing needs the same lora.target_modules"
        )
    for key, tensor in a.tensors.items():
        if tensor.shape != b.tensors[key].shape:
            raise UserError(
                f"LoRA ranks differ ({sorted(a.ranks)} in {str(a.source)!r} vs {sorted(b.ranks)} in "
                f"{str(b.source)!r}); parameter mixing needs equal lora.rank (soup_mode='delta' does not)"
            )
    if a.config_value("lora_alpha") != b.config_value("lora_alpha"):
        raise UserError(
            f"LoRA alphas differ ({a.config_value('lora_alpha')} vs {b.config_value('lora_alpha')}); "
            "parameter mixing needs equal lora.alpha (soup_mode='delta' does not)"
        )


def check_matches_config(weights: LoraWeights, lora_config) -> None:
    """Refuse to resume training into an adapter shaped differently from the checkpoint's."""
    expected = {
        "r": lora_config.rank,
        "lora_alpha": lora_config.alpha,
        "target_modules": sorted(lora_config.target_modules),
    }
    for name, value in expected.items():
        found = weights.config_value(name)
        found = sorted(found) if isinstance(found, list) else found
        if found != value:
            raise UserError(
                f"the checkpoint {str(weights.source.parent)!r} has LoRA {name}={found}, the config asks for "
                f"{value}; resume with the checkpoint's lora.* settings"
            )


def copy_into_adapter(unet, weights: LoraWeights, adapter_name: str = "default") -> None:
    """Overwrite the tensors of an existing adapter with `weights`, bit for bit."""
    state = weights.unet_state_dict()
    current = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    if state.keys() != current.keys() or any(state[k].shape != current[k].shape for k in state):
        raise UserError(f"the LoRA in {str(weights.source)!r} does not fit the adapter of this model")
    result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"the LoRA in {str(weights.source)!r} has tensors this model lacks")


def add_adapter(unet, weights: LoraWeights, adapter_name: str) -> None:
    """Load `weights` as a new adapter the way diffusers' `load_lora_weights` does (config from the header)."""
    missing = weights.modules - {name for name, _ in unet.named_modules()}
    if missing:
        raise UserError(
            f"the LoRA {str(weights.source)!r} targets {len(missing)} modules this model lacks "
            f"(e.g. {sorted(missing)[0]}); was it trained on another base model?"
        )
    try:
        unet.load_lora_adapter(
            dict(weights.tensors), prefix=PREFIX.rstrip("."), adapter_name=adapter_name, metadata=weights.metadata
        )
    except (ValueError, RuntimeError, KeyError) as error:
        raise UserError(f"cannot load the LoRA {str(weights.source)!r} into this model: {error}") from None
