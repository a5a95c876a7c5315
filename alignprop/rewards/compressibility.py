"""Compressibility: a differentiable stand-in for JPEG file size, with the real size reported beside it.

JPEG spends its bits on high-frequency detail, so the mean absolute difference between neighbouring
pixels (total variation) tracks file size. reward = -TV (in 0..255 units per pixel pair), so smoother
images score higher. `metrics["jpeg_kb"]` is the real size (PIL, quality 95) so the proxy can be checked
against the thing it stands for.
"""

import io

import numpy as np
import torch
from PIL import Image

from alignprop.rewards.base import Reward, RewardResult
from alignprop.rewards.images import to_unit_range
from alignprop.rewards.registry import register


def total_variation(pixels: torch.Tensor) -> torch.Tensor:
    """Mean |neighbour difference| per image, horizontally and vertically, for pixels in [0, 255]."""
    dx = (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    dy = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    return (dx + dy) / 2


def jpeg_kilobytes(pixels: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Real JPEG size in kB of each image (pixels in [0, 1], NCHW). Not differentiable."""
    sizes = []
    arrays = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    for array in arrays.permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes)


class Compressibility(Reward):
    def score(self, images, prompts):
        pixels = to_unit_range(images)
        reward = -total_variation(pixels * 255)
        return RewardResult(loss=-reward, reward=reward.detach(), metrics={"jpeg_kb": jpeg_kilobytes(pixels)})


@register("compressibility")
def build(settings):
    return Compressibility()
