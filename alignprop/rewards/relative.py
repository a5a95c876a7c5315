"""SRPO's relative reward (Shen et al. 2025, "Semantic Relative Preference Optimization"): a text-conditioned
reward scored twice, with a positive and a negative control phrase put in front of the prompt, and the difference
kept: r(x, "<positive> <prompt>") - r(x, "<negative> <prompt>"). What both phrasings reward alike (a bias of the
reward model that is not about the control, e.g. over-saturation) cancels; the difference steers towards the
positive phrase. `rewards.relative_control = (positive, negative)`, for the rewards that read the prompt.
"""

from __future__ import annotations

import torch

from alignprop.errors import UserError
from alignprop.rewards.base import Reward, RewardResult

TEXT_CONDITIONED = ("hps", "pickscore", "clip_score", "imagereward")


def controlled(phrase: str, prompts: list[str]) -> list[str]:
    return [f"{phrase} {prompt}".strip() for prompt in prompts]


class Relative(Reward):
    def __init__(self, base: Reward, positive: str, negative: str):
        super().__init__()
        self.base, self.positive, self.negative = base, positive, negative

    def score(
        self, images: torch.Tensor, prompts: list[str], positive_boost: float = 0.0, swapped: bool = False
    ) -> RewardResult:
        """(1 + positive_boost) r(positive) - r(negative); `swapped`: the two phrases exchanged. SRPO's Direct-Align
        puts its discount k there: (1 + k) pos - neg on its denoise branch, (1 + k) neg - pos on its inversion
        branch (`Tencent-Hunyuan/SRPO` `fastvideo/SRPO.py:223-236, 618-620`)."""
        first, second = (self.negative, self.positive) if swapped else (self.positive, self.negative)
        positive = self.base.score(images, controlled(first, prompts))
        negative = self.base.score(images, controlled(second, prompts))
        metrics = {"reward_positive": positive.reward.detach(), "reward_negative": negative.reward.detach()}
        boost = 1.0 + positive_boost
        # Every text-conditioned loss is (constant - reward) x scale, so this loss is -(the relative reward) x scale
        # up to a constant.
        reward = (boost * positive.reward - negative.reward).detach()
        return RewardResult(boost * positive.loss - negative.loss, reward, metrics)


def check_relative_control(reward_fn: str, control) -> None:
    """One line for a control pair that is malformed or asked of a reward that does not read the prompt."""
    if not control:
        return
    if len(control) != 2 or not all(isinstance(phrase, str) for phrase in control) or control[0] == control[1]:
        raise UserError(
            "rewards.relative_control must be two different phrases (positive, negative), e.g. "
            "('Realistic photo,', 'CG render,')"
        )
    if reward_fn not in TEXT_CONDITIONED:
        raise UserError(
            f"rewards.relative_control needs a reward that reads the prompt ({', '.join(TEXT_CONDITIONED)}); "
            f"reward_fn={reward_fn!r} does not"
        )
