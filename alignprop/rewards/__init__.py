"""Rewards by name. Each reward lives in its own module and registers a builder here.

A builder takes `(config, device, dtype)` and returns a frozen `Reward`. `config.reward_fn` names it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from ml_collections import ConfigDict

from alignprop.errors import UserError
from alignprop.rewards.base import Reward, RewardResult

Builder = Callable[[ConfigDict, torch.device, torch.dtype], Reward]
REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        REGISTRY[name] = builder
        return builder

    return add


def check_reward_name(name: str) -> None:
    if name not in REGISTRY:
        raise UserError(f"unknown reward_fn {name!r}; choose one of: {', '.join(sorted(REGISTRY))}")


def build_reward(config: ConfigDict, device: torch.device, dtype: torch.dtype) -> Reward:
    check_reward_name(config.reward_fn)
    return REGISTRY[config.reward_fn](config, device, dtype).to(device).freeze()


# Importing the modules fills the registry.
from alignprop.rewards import (  # noqa: E402,F401
    aesthetic,
    clip_score,
    colorfulness,
    combined,
    compressibility,
    hps,
    pickscore,
)
from alignprop.toyworld import rewards as toyworld_rewards  # noqa: E402,F401  (toyworld_colour, _shape, _area, _position)

__all__ = ["REGISTRY", "Reward", "RewardResult", "build_reward", "check_reward_name", "register"]
