"""A weighted sum of named rewards: `reward_fn="combined"` with
`config.rewards.combination = "aesthetic:1.0,hps:0.5"` (a weight left out means 1.0).

loss = sum_i w_i x loss_i and reward = sum_i w_i x reward_i. Each component's own (unweighted) reward is
in `metrics` under its name, and its own metrics under "name/metric", so every part is logged beside the
total. Each component is built the way it would be alone, from its usual options (config.rewards.<name>,
aesthetic_target, ...).
"""

from __future__ import annotations

import torch

from alignprop.errors import UserError
from alignprop.rewards.base import Reward, RewardResult
from alignprop.rewards.registry import RewardSettings, check_reward_name, register

OPTION = "config.rewards.combination"


def parse_combination(text: str) -> dict[str, float]:
    """ "aesthetic:1.0,hps:0.5" -> {"aesthetic": 1.0, "hps": 0.5}."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = (piece.strip() for piece in item.partition(":"))
        if name == "combined":
            raise UserError(f"{OPTION}: 'combined' cannot be a component of itself")
        check_reward_name(name)
        if name in weights:
            raise UserError(f"{OPTION}: {name!r} is listed twice")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(f"{OPTION}: weight {weight!r} of {name!r} is not a number") from None
    if not weights:
        raise UserError(f"reward_fn='combined' needs {OPTION}, e.g. 'aesthetic:1.0,hps:0.5'")
    return weights


class Combined(Reward):
    def __init__(self, components: dict[str, Reward], weights: dict[str, float]):
        super().__init__()
        self.components = torch.nn.ModuleDict(components)
        self.weights = dict(weights)

    def score(self, images, prompts):
        loss = reward = 0
        metrics = {}
        for name, component in self.components.items():
            result = component.score(images, prompts)
            loss = loss + self.weights[name] * result.loss
            reward = reward + self.weights[name] * result.reward
            metrics[name] = result.reward.detach()
            metrics.update({f"{name}/{key}": value for key, value in result.metrics.items()})
        return RewardResult(loss=loss, reward=reward.detach(), metrics=metrics)


@register("combined", section="combination")
def build(settings: RewardSettings) -> Combined:
    weights = parse_combination(settings.options)
    return Combined({name: settings.build_part(name) for name in weights}, weights)
