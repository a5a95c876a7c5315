"""LoRA weights on disk in diffusers' format: read them, compare them, put them into a UNet.

The file is what `StableDiffusionPipeline.save_lora_weights` writes (`pytorch_lora_weights.safetensors`,
keys `unet.<module>.lora.down/up.weight`, the peft `LoraConfig` in the header), so the same file loads
into a stock diffusers pipeline with `load_lora_weights(directory)`.

The original AlignProp code's checkpoints (accelerate state directories) hold their LoRA as
`pytorch_lora_weights.bin` instead: a torch pickle in diffusers' old attention-processor layout
(`<attention>.processor.to_q_lora.down.weight`, ..., `to_out_lora.up.weight`, sometimes prefixed `unet.`).
`read_lora` reads it with `torch.load(weights_only=True)` and converts it with diffusers' own key mapping.
Those processors added `up(down(x))` to each projection unscaled, i.e. alpha = rank in peft's terms.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from diffusers.utils.state_dict_utils import StateDictType
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from alignprop.errors import UserError

LORA_FILE_NAME = "pytorch_lora_weights.safetensors"
ORIGINAL_LORA_FILE_NAME = "pytorch_lora_weights.bin"  # the original code's (old attention-processor layout)
METADATA_KEY = "lora_adapter_metadata"  # diffusers' header field for the adapter's LoraConfig
PREFIX = "unet."  # the UNet families' key prefix (and the original code's)
PREFIXES = (PREFIX, "transformer.")  # the denoiser's key prefix in a diffusers LoRA file, by family


@dataclass(frozen=True)
class LoraWeights:
    tensors: dict[str, torch.Tensor]  # diffusers format, keys prefixed with "unet." or "transformer."
    metadata: dict | None  # the LoraConfig fields, keys prefixed the same way; None in files from elsewhere
    source: Path

    @property
    def prefix(self) -> str:
        """ "unet." or "transformer.": which kind of denoiser the file is for."""
        return next(prefix for prefix in PREFIXES if next(iter(self.tensors)).startswith(prefix))

    @property
    def modules(self) -> set[str]:
        """The denoiser modules the adapter changes (e.g. `...attn1.to_q`)."""
        return {key.removeprefix(self.prefix).rsplit(".lora.", 1)[0] for key in self.tensors}

    @property
    def ranks(self) -> set[int]:
        return {tensor.shape[0] for key, tensor in self.tensors.items() if key.endswith("lora.down.weight")}

    @property
    def from_original_code(self) -> bool:
        """Read from an original AlignProp checkpoint (its LoRA file has no optimizer state we can use)."""
        return self.source.name == ORIGINAL_LORA_FILE_NAME

    def config_value(self, name: str):
        """A LoraConfig field (r, lora_alpha, target_modules): from the header, or as diffusers infers it for
        a file without one (rank from the tensors, alpha = rank)."""
        if self.metadata is not None:
            return self.metadata.get(self.prefix + name)
        if len(self.ranks) != 1:
            return None
        (rank,) = self.ranks
        inferred = {"r": rank, "lora_alpha": rank, "target_modules": sorted({short_name(m) for m in self.modules})}
        return inferred.get(name)

    def denoiser_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors without the prefix, in peft's naming (`lora_A` / `lora_B`)."""
        return convert_unet_state_dict_to_peft({k.removeprefix(self.prefix): v for k, v in self.tensors.items()})


def short_name(module: str) -> str:
    """`...attn1.to_q` -> `to_q`, `...attn1.to_out.0` -> `to_out.0`: the name lora.target_modules uses."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def is_original_checkpoint(path: Path) -> bool:
    """A directory the original AlignProp code wrote (its LoRA in `pytorch_lora_weights.bin`), not this project.

    It can be evaluated and souped; training resumed from it starts a new optimizer (none is readable there)."""
    path = Path(path)
    return path.is_dir() and (path / ORIGINAL_LORA_FILE_NAME).is_file() and not (path / LORA_FILE_NAME).is_file()


def lora_file(path: Path) -> Path:
    """The weights file of a LoRA directory (or the file itself)."""
    if not path.is_dir():
        return path
    return path / (ORIGINAL_LORA_FILE_NAME if is_original_checkpoint(path) else LORA_FILE_NAME)


def read_lora(path: Path) -> LoraWeights:
    """Read a diffusers LoRA file, or an original AlignProp one, safely (tensors only, no code); UserError when
    it is neither."""
    file = lora_file(Path(path))
    if not file.is_file():
        raise UserError(
            f"no LoRA weights at {str(file)!r} (expected a {LORA_FILE_NAME} file, or the original code's "
            f"{ORIGINAL_LORA_FILE_NAME})"
        )
    if file.suffix == ".bin":
        return read_original_lora(file)
    try:
        tensors = _diffusers_keys(load_file(str(file), device="cpu"))
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
        metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else None
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read LoRA weights {str(file)!r}: {error}") from None
    prefixes = {next((p for p in PREFIXES if key.startswith(p)), None) for key in tensors}
    if not tensors or len(prefixes) != 1 or None in prefixes or not all(".lora." in key for key in tensors):
        raise UserError(
            f"{str(file)!r} is not a diffusers LoRA of a UNet or transformer (keys like "
            "'unet.<module>.lora.down.weight')"
        )
    return LoraWeights(tensors, metadata, file)


def _diffusers_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's key layout (`<module>.lora_A.weight`: what diffusers' SD3 / FLUX pipelines save, and what their
    DreamBooth-LoRA scripts write) -> the `<module>.lora.down.weight` layout the rest of this module reads."""
    renamed = (key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.") for key in tensors)
    return dict(zip(renamed, tensors.values()))


def read_original_lora(file: Path) -> LoraWeights:
    """The original code's `pytorch_lora_weights.bin` (what `unet.save_attn_procs` wrote), in our format."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Weights only load failed" in reason:
            reason = "it needs arbitrary code to unpickle (refused: only tensors load)"
        raise UserError(f"cannot read LoRA weights {str(file)!r}: {reason}") from None
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(value, torch.Tensor) for value in state.values())
        or not all(isinstance(key, str) and ".processor." in key and "_lora." in key for key in state)
    ):
        raise UserError(
            f"{str(file)!r} is not an attention-processor LoRA (keys like "
            "'<attention>.processor.to_q_lora.down.weight')"
        )
    # diffusers' own mappings: old processor keys -> peft's (`to_q.lora_A`) -> its LoRA file format (`to_q.lora.down`)
    peft_keys = convert_unet_state_dict_to_peft({key.removeprefix(PREFIX): value for key, value in state.items()})
    tensors = convert_state_dict_to_diffusers(peft_keys, original_type=StateDictType.PEFT)
    unknown = sorted(key for key in tensors if not key.endswith((".lora.down.weight", ".lora.up.weight")))
    if unknown:
        raise UserError(f"{str(file)!r} holds LoRA tensors of unknown projections (e.g. {unknown[0]})")
    return LoraWeights({PREFIX + key: value for key, value in tensors.items()}, None, file)


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


def copy_into_adapter(denoiser, weights: LoraWeights, adapter_name: str = "default") -> None:
    """Overwrite the tensors of an existing adapter with `weights`, bit for bit."""
    state = weights.denoiser_state_dict()
    current = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    if state.keys() != current.keys() or any(state[k].shape != current[k].shape for k in state):
        raise UserError(f"the LoRA in {str(weights.source)!r} does not fit the adapter of this model")
    result = set_peft_model_state_dict(denoiser, state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"the LoRA in {str(weights.source)!r} has tensors this model lacks")


def add_adapter(denoiser, weights: LoraWeights, adapter_name: str) -> None:
    """Load `weights` as a new adapter the way diffusers' `load_lora_weights` does (config from the header).
    A LoRA of another model or family (SD1.5 into SDXL, a UNet's into a transformer) is one clear line."""
    missing = weights.modules - {name for name, _ in denoiser.named_modules()}
    if missing:
        raise UserError(
            f"the LoRA {str(weights.source)!r} targets {len(missing)} modules this model lacks "
            f"(e.g. {sorted(missing)[0]}); was it trained on another base model?"
        )
    try:
        denoiser.load_lora_adapter(
            dict(weights.tensors),
            prefix=weights.prefix.rstrip("."),
            adapter_name=adapter_name,
            metadata=weights.metadata,
        )
    except (ValueError, RuntimeError, KeyError) as error:
        raise UserError(f"cannot load the LoRA {str(weights.source)!r} into this model: {error}") from None
