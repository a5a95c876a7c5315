"""Differentiable image helpers shared by rewards."""

import torch


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (as the original did before scoring), in float32."""
    return (images.float() / 2 + 0.5).clamp(0, 1)
