"""Finding and reading reward weights: local files or the Hugging Face hub, plain tensors only.

Every file is read with safetensors or `torch.load(..., weights_only=True)`: a checkpoint that needs
arbitrary pickled Python objects is refused, because unpickling runs code. Every failure a user can fix
(missing file, offline hub, wrong model) becomes a one-line `UserError` naming the config option to set.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from alignprop.errors import UserError, excerpt, shorten

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# How torch's weights-only unpickler names a refused class.
UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def resolve_file(local_path: str, repo: str, filename: str, option: str) -> Path:
    """The weights file to read: `local_path` when given, else `filename` fetched from hub `repo` (cached)."""
    if local_path:
        path = Path(local_path).expanduser()
        if not path.is_file():
            raise UserError(f"weights file {excerpt(str(path))} does not exist; set {option} to an existing file")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as error:  # offline, unknown repo, gated, ...: the fix is the same
        raise UserError(
            f"cannot fetch {excerpt(filename)} from the Hugging Face hub repo {excerpt(repo)} "
            f"({type(error).__name__}); download it and set {option}=/path/to/{shorten(filename, 60)}"
        ) from None


def pretrained_source(source: str, option: str) -> str:
    """A `from_pretrained` source: an existing local directory, or a hub id like `owner/name`."""
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise UserError(f"{option}={excerpt(source)} is a file; point it at a model directory or a hub id")
    if not HUB_ID.match(source):
        raise UserError(f"{option}={excerpt(source)} is neither an existing directory nor a hub id like 'owner/name'")
    return source


def load_tensor_file(path: Path) -> dict:
    """Read a .safetensors file or a torch file of plain tensors (weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:
            raise UserError(f"cannot read safetensors file {excerpt(str(path))}: {shorten(str(error), 100)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = UNSAFE_GLOBAL.search(str(error))
        if refused:
            raise UserError(
                f"{excerpt(str(path))} holds pickled Python objects ({refused.group(1)}), not only tensors, and is "
                "refused for safety (torch.load weights_only=True); re-save its state_dict() with torch.save "
                "or safetensors"
            ) from None
        raise UserError(
            f"cannot read weights file {excerpt(str(path))}: not a torch or safetensors file of plain tensors"
        ) from None
    except Exception as error:
        raise UserError(
            f"cannot read weights file {excerpt(str(path))}: {type(error).__name__}: {shorten(str(error), 100)}"
        ) from None


def extract_state_dict(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a bare state dict, or one under 'state_dict' (training checkpoints)."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise UserError(f"{excerpt(str(path))} is not a state dict (a mapping of parameter names to tensors)")
    if not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise UserError(f"{excerpt(str(path))} is not a state dict: some of its values are not tensors")
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    if all(key.startswith("module.") for key in checkpoint):
        checkpoint = {key[len("module.") :]: value for key, value in checkpoint.items()}
    return checkpoint


def incompatibilities(module: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable reasons why `state_dict` does not fit `module` (empty when it fits exactly)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if state_dict[key].shape != expected[key].shape
    ]
    reasons = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            reasons.append(f"{len(keys)} {label} (e.g. {keys[0]})")
    return reasons


def load_weights_into(module: torch.nn.Module, path: Path, what: str, option: str) -> None:
    """Load the state dict in `path` into `module`, which must match it exactly."""
    state_dict = extract_state_dict(load_tensor_file(path), path)
    reasons = incompatibilities(module, state_dict)
    if reasons:
        raise UserError(f"{excerpt(str(path))} is not a {what} checkpoint: {'; '.join(reasons)}; check {option}")
    module.load_state_dict(state_dict, strict=True)
