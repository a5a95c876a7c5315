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

TEXT_CONDITIONED = ("hps", "pickscore", "clip_score")


def controlled(phrase: str, prompts: list[str]) -> list[str]:
    return [f"{phrase} {prompt}".strip() for prompt in prompts]


class Relative(Reward):
    def __init__(self, base: Reward, positive: str, negative: str):
        super().__init__()
        self.base, self.positive, self.negative = base, positive, negative

    def score(self, images: torch.Tensor, prompts: list[str]) -> RewardResult:
        positive = self.base.score(images, controlled(self.positive, prompts))
        negative = self.base.score(images, controlled(self.negative, prompts))
        metrics = {"reward_positive": positive.reward.detach(), "reward_negative": negative.reward.detach()}
        # Every text-conditioned loss is (constant - reward) x scale, so the loss difference is -(relative reward).
        return RewardResult(positive.loss - negative.loss, (positive.reward - negative.reward).detach(), metrics)


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
