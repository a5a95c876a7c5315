"""Colourfulness (Hasler and Suesstrunk, 2003), made differentiable.

With rg = R - G and yb = (R + G) / 2 - B on a 0..255 scale:
C = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2). Grey images score 0; the paper
reads ~15 as "slightly", ~60 as "quite", ~110 as "extremely" colourful.
"""

import torch

from alignprop.rewards.base import Reward, RewardResult
from alignprop.rewards.images import to_unit_range
from alignprop.rewards.registry import register

EPS = 1e-6  # keeps sqrt differentiable at exactly grey images


def colorfulness(pixels: torch.Tensor) -> torch.Tensor:
    """Per-image colourfulness for pixels in [0, 255], NCHW."""
    red, green, blue = pixels.unbind(dim=1)
    rg = (red - green).flatten(1)
    yb = ((red + green) / 2 - blue).flatten(1)
    spread = (rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False) + EPS).sqrt()
    offset = (rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2 + EPS).sqrt()
    return spread + 0.3 * offset


class Colorfulness(Reward):
    def score(self, images, prompts):
        reward = colorfulness(to_unit_range(images) * 255)
        return RewardResult(loss=-reward, reward=reward.detach())


@register("colorfulness")
def build(settings):
    return Colorfulness()
