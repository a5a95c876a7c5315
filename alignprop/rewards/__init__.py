"""Rewards by name: `build_reward(config, device, dtype)` makes the frozen reward `config.reward_fn` names.

Each reward lives in its own module and registers a builder in `alignprop.rewards.registry`; a builder gets
only its own options section and the few shared settings (`RewardSettings`), and returns a `Reward` whose
`score(images, prompts)` gives a `RewardResult`.
"""

from alignprop.rewards.base import Reward, RewardResult
from alignprop.rewards.registry import (
    REGISTRY,
    RewardSettings,
    build_reward,
    check_reward_name,
    listed_rewards,
    register,
)

__all__ = [
    "REGISTRY",
    "Reward",
    "RewardResult",
    "RewardSettings",
    "build_reward",
    "check_reward_name",
    "listed_rewards",
    "register",
]
