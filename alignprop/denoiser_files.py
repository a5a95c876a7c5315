"""A whole denoiser on disk in its pipeline component's own layout (`train.finetune="full"`): write it, check it,
read it back into a model.

The folder is what diffusers' `ModelMixin.save_pretrained` writes: `config.json` and
`diffusion_pytorch_model.safetensors` (above 10 GB: numbered shards and their `.index.json`). So
`UNet2DConditionModel.from_pretrained(folder)` (or `SD3Transformer2DModel`, `FluxTransformer2DModel`) loads it, and a
stock pipeline samples with it given as its `unet=` / `transformer=`. Reading never runs code (safetensors only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
from huggingface_hub import save_torch_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from alignprop.errors import UserError
from alignprop.written_files import give_normal_mode


def is_denoiser_folder(path: Path) -> bool:
    """A folder holding a saved denoiser (its config and weights, one file or an index of shards)."""
    path = Path(path)
    has_weights = (path / SAFETENSORS_WEIGHTS_NAME).is_file() or (path / SAFE_WEIGHTS_INDEX_NAME).is_file()
    return path.is_dir() and (path / CONFIG_NAME).is_file() and has_weights


def save_denoiser(denoiser, folder: Path, class_name: str, state: dict[str, torch.Tensor] | None = None) -> None:
    """The denoiser's config and weights as `save_pretrained` lays them out (shards above 10 GB, as it does).
    `class_name`: the model class `from_pretrained` builds (a sharded denoiser's own class is FSDP's subclass);
    `state`: its state dict (a sharded denoiser's, gathered), else its own (fp32 master weights while training)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(denoiser.to_json_string())
    config["_class_name"] = class_name
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    pattern = SAFETENSORS_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    weights = denoiser.state_dict() if state is None else state
    save_torch_state_dict(weights, folder, filename_pattern=pattern, max_shard_size="10GB")
    give_normal_mode(folder)  # safetensors writes owner-only files


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a saved denoiser: the single file, or every shard its index names."""
    single = folder / SAFETENSORS_WEIGHTS_NAME
    if single.is_file():
        return [single]
    try:
        weight_map = json.loads((folder / SAFE_WEIGHTS_INDEX_NAME).read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"cannot read the shard index of {str(folder)!r}: {error}") from None
    if not names or any(Path(name).name != name for name in names):  # shard names never lead out of the folder
        raise UserError(f"the shard index of {str(folder)!r} names no shards, or paths outside its folder")
    return [folder / name for name in names]


def saved_class_name(folder: Path) -> str:
    """The model class `config.json` names (what `from_pretrained` builds)."""
    try:
        name = json.loads((folder / CONFIG_NAME).read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as error:
        raise UserError(f"cannot read {str(folder / CONFIG_NAME)!r}: {error}") from None
    if not isinstance(name, str):
        raise UserError(f"{str(folder / CONFIG_NAME)!r} names no model class (_class_name)")
    return name


def check_denoiser_folder(folder: Path) -> None:
    """Readable without loading the weights: the config names a class, every weights file's header reads."""
    if not is_denoiser_folder(folder):
        raise UserError(
            f"no saved denoiser at {str(folder)!r} (expected {CONFIG_NAME} and {SAFETENSORS_WEIGHTS_NAME}, as "
            "save_pretrained writes them)"
        )
    saved_class_name(folder)
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise UserError(f"cannot read the denoiser weights {str(file)!r}: {error}") from None


def read_denoiser_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved denoiser, on the CPU."""
    state = {}
    for file in weight_files(folder):
        try:
            state.update(load_file(str(file), device="cpu"))
        except (SafetensorError, OSError) as error:
            raise UserError(f"cannot read the denoiser weights {str(file)!r}: {error}") from None
    return state


def check_fits(denoiser: torch.nn.Module, folder: Path, state: dict[str, torch.Tensor]) -> None:
    """One line for weights of another model class, architecture or size."""
    name = saved_class_name(folder)
    if name != type(denoiser).__name__:
        raise UserError(f"{str(folder)!r} holds a {name}; this model's denoiser is a {type(denoiser).__name__}")
    expected = {key: param.shape for key, param in denoiser.state_dict().items()}
    if expected.keys() != state.keys() or any(state[key].shape != shape for key, shape in expected.items()):
        different = sorted(expected.keys() ^ state.keys()) or [k for k in expected if state[k].shape != expected[k]]
        raise UserError(
            f"the denoiser in {str(folder)!r} does not fit this model (e.g. {different[0]}); was it trained on "
            "another base model?"
        )


def load_denoiser_weights(denoiser: torch.nn.Module, folder: Path) -> None:
    """Overwrite every weight of `denoiser` with the saved ones (bit for bit in the same dtype, else cast)."""
    state = read_denoiser_state(folder)
    check_fits(denoiser, folder, state)
    with torch.no_grad():
        denoiser.load_state_dict(state, strict=True)
