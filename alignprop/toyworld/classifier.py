"""The learned shape classifier behind the learned reward: a small CNN trained on rendered scenes only.

It plays the part the aesthetic predictor plays for Stable Diffusion: a frozen network that scores an
attribute of an image. Like it, it never saw generated images, so it can be fooled; the checker is the
ground truth that shows when it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alignprop.toyworld.world import SHAPES
from alignprop.written_files import give_normal_mode

WIDTHS = (32, 64, 64)


def conv_block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1),
        nn.GroupNorm(8, channels_out),
        nn.GELU(),
        nn.Conv2d(channels_out, channels_out, 3, padding=1),
        nn.GELU(),
        nn.AvgPool2d(2),
    )


class ShapeClassifier(nn.Module):
    """Images (N, 3, 32, 32) in [-1, 1] -> logits over SHAPES."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS):
        super().__init__()
        channels = (3, *widths)
        self.features = nn.Sequential(*(conv_block(a, b) for a, b in zip(channels, channels[1:])))
        self.head = nn.Linear(widths[-1], len(SHAPES))
        self.widths = tuple(widths)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))


def save(model: ShapeClassifier, path: Path, info: dict) -> None:
    """Weights as safetensors, with the architecture and the classes in the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"widths": json.dumps(model.widths), "classes": json.dumps(SHAPES), "info": json.dumps(info)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    give_normal_mode(path)  # safetensors writes owner-only files


def load(path: Path) -> ShapeClassifier:
    """A frozen classifier from a safetensors file written by `save` (tensors only, no code runs)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if tuple(json.loads(metadata.get("classes", "[]"))) != SHAPES:
        raise ValueError(f"{path} is not a toy-world shape classifier for classes {SHAPES}")
    model = ShapeClassifier(tuple(json.loads(metadata["widths"])))
    model.load_state_dict(load_file(str(path)))
    return model.requires_grad_(False).eval()
