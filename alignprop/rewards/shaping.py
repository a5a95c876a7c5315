"""Loss shapes: what training minimises per sample, given a reward's own loss (`reward_loss`).

- "reward" (the default): the reward's own loss, unchanged (its linear or target form, e.g. aesthetic's
  |r - aesthetic_target|, HPS's 1 - r, PickScore's -r).
- "threshold": ReFL's / SRPO's hinge relu(threshold - r) (ImageReward's ReFL: relu(2 - r); SRPO: relu(0.7 - r)).
  A sample whose reward reaches `reward_threshold` contributes neither loss nor gradient; the others keep
  their own loss's gradient. Its value is relu(threshold - r). For a reward whose loss is c - r (every shipped
  one below its target) the gradient is exactly that of relu(threshold - r); for c - s * r it is s times it.
"""

from __future__ import annotations

import torch

from alignprop.errors import UserError
from alignprop.rewards.base import RewardResult

SHAPES = ("reward", "threshold")


def check(config) -> None:
    if config.reward_loss not in SHAPES:
        raise UserError(f"reward_loss={config.reward_loss!r}; choose one of: {', '.join(SHAPES)}")


def shaped_loss(result: RewardResult, shape: str = "reward", threshold: float = 0.0) -> torch.Tensor:
    """Per-sample loss of `result` under `shape`."""
    if shape == "reward":
        return result.loss
    if shape == "threshold":
        reward = result.reward.detach().to(result.loss.dtype)
        below = (reward < threshold).to(result.loss.dtype)
        gradient_part = (result.loss - result.loss.detach()) * below
        return torch.relu(threshold - reward) + gradient_part
    raise UserError(f"reward_loss={shape!r}; choose one of: {', '.join(SHAPES)}")


def shaper_from_config(config):
    """`shaped_loss` with the config's shape and threshold, as a function of a RewardResult."""
    shape, threshold = config.get("reward_loss", "reward"), config.get("reward_threshold", 0.0)
    return lambda result: shaped_loss(result, shape, threshold)
