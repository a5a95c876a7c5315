"""What every reward is: a frozen, differentiable scorer of images in [-1, 1]."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch


@dataclass
class RewardResult:
    """Per-sample outputs of one reward call.

    loss:    differentiable w.r.t. the images; the training loop minimises its mean.
    reward:  the score users read (higher is better); detached is fine.
    metrics: extra named per-sample values for logging (components of a combined reward, the real
             JPEG size behind a proxy, ...). Always detached.
    """

    loss: torch.Tensor
    reward: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Reward(torch.nn.Module, abc.ABC):
    """Base class. Subclasses implement `score`, the one way to use a reward.

    Rewards are frozen: their parameters never require grad and they stay in eval mode. `image_size`: the (height,
    width) a reward can read (None: any; it resizes itself).
    """

    image_size: tuple[int, int] | None = None

    @abc.abstractmethod
    def score(self, images: torch.Tensor, prompts: list[str]) -> RewardResult:
        """Score a batch of images (N, 3, H, W) in [-1, 1] against their prompts."""

    def freeze(self) -> Reward:
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Reward:
        # Frozen models never leave eval mode (dropout in the aesthetic head must stay off).
        return super().train(False)
