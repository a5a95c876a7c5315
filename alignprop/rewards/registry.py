"""The reward registry: names -> builders, and the one entry point that turns a config into a reward.

A reward module registers its builder with `@register(name, section=...)`. A builder gets a `RewardSettings`
(its own `config.rewards.<section>` plus the few settings shared by every reward), never the whole config.
The modules listed in `REWARD_MODULES` are imported on the first lookup, so this registry imports none of
them (the toy world's rewards included: it sits above this package and registers itself the same way).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from alignprop.errors import UserError
from alignprop.rewards.base import Reward

# Every module that registers rewards; imported once, on the first lookup.
REWARD_MODULES = (
    "alignprop.rewards.aesthetic",
    "alignprop.rewards.clip_score",
    "alignprop.rewards.colorfulness",
    "alignprop.rewards.combined",
    "alignprop.rewards.compressibility",
    "alignprop.rewards.hps",
    "alignprop.rewards.imagereward",
    "alignprop.rewards.pickscore",
    "alignprop.toyworld.rewards",
)
PREPROCESS_MODES = ("original", "processor")


@dataclass(frozen=True)
class RewardSettings:
    """What a builder gets.

    options:    its own section, `config.rewards.<section>` (None for rewards without options);
    dtype:      the inference dtype its models load in;
    aesthetic_target, grad_scale: the original's top-level loss settings (the aesthetic reward's);
    preprocess: `config.rewards.preprocess`, how images become CLIP inputs ("original" | "processor");
    build_part: builds another registered reward from the same config (for `combined`).
    """

    options: Any = None
    dtype: torch.dtype = torch.float32
    aesthetic_target: float | None = 10.0
    grad_scale: float = 1.0
    preprocess: str = "processor"
    build_part: Callable[[str], Reward] | None = None


Builder = Callable[[RewardSettings], Reward]


@dataclass(frozen=True)
class Entry:
    build: Builder
    section: str | None  # the config.rewards.<section> its builder reads; None: it has no options


class Registry(Mapping):
    """name -> Entry; complete on first read (the reward modules are imported then)."""

    def __init__(self):
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def add(self, name: str, entry: Entry) -> None:
        self._entries[name] = entry

    def _load(self) -> dict[str, Entry]:
        if not self._loaded:
            self._loaded = True  # first, so that a module reading the registry while it loads does not recurse
            for module in REWARD_MODULES:
                importlib.import_module(module)
        return self._entries

    def __getitem__(self, name: str) -> Entry:
        return self._load()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(dict(self._load()))

    def __len__(self) -> int:
        return len(self._load())


REGISTRY = Registry()


def register(name: str, section: str | None = None) -> Callable[[Builder], Builder]:
    """Decorator: `builder` makes reward `name` from `config.rewards.<section>` (section None: no options)."""

    def add(builder: Builder) -> Builder:
        REGISTRY.add(name, Entry(builder, section))
        return builder

    return add


def listed_rewards(names: str) -> list[str]:
    """The reward names of a comma list (`eval_reward_fns`), in order, blanks dropped."""
    return [name for name in (part.strip() for part in names.split(",")) if name]


def check_reward_name(name: str) -> None:
    if name not in REGISTRY:
        raise UserError(f"unknown reward_fn {name!r}; choose one of: {', '.join(sorted(REGISTRY))}")


def check_preprocess(mode: str) -> str:
    if mode not in PREPROCESS_MODES:
        raise UserError(f"rewards.preprocess={mode!r}; choose one of: {', '.join(PREPROCESS_MODES)}")
    return mode


def reward_settings(name: str, config, dtype: torch.dtype) -> RewardSettings:
    """The part of `config` that reward `name` reads. Top-level keys a minimal config lacks keep their defaults."""
    section = REGISTRY[name].section
    rewards = config.get("rewards") or {}
    if section is not None and section not in rewards:
        raise UserError(f"reward_fn={name!r} needs config.rewards.{section} (see config/align_prop.py)")
    defaults = RewardSettings()
    return RewardSettings(
        options=rewards[section] if section is not None else None,
        dtype=dtype,
        aesthetic_target=config.get("aesthetic_target", defaults.aesthetic_target),
        grad_scale=config.get("grad_scale", defaults.grad_scale),
        preprocess=check_preprocess(rewards.get("preprocess", defaults.preprocess)),
        build_part=lambda part: build_unfrozen(part, config, dtype),
    )


def build_unfrozen(name: str, config, dtype: torch.dtype) -> Reward:
    check_reward_name(name)
    return REGISTRY[name].build(reward_settings(name, config, dtype))


def build_reward(config, device: torch.device, dtype: torch.dtype) -> Reward:
    """The reward `config.reward_fn`, frozen, on `device`; its models load in `dtype`; SRPO's relative form when
    `rewards.relative_control` names a positive and a negative phrase."""
    from alignprop.rewards.relative import Relative, check_relative_control

    reward = build_unfrozen(config.reward_fn, config, dtype)
    control = tuple((config.get("rewards") or {}).get("relative_control", ()))
    check_relative_control(config.reward_fn, control)
    if control:
        reward = Relative(reward, *control)
    return reward.to(device).freeze()
