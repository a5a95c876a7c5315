"""Truncated backpropagation: which steps' denoiser calls keep their gradient.

A truncation *plan* says, for each of the T steps (0 = first, noisiest), whether that step's denoiser call
keeps its gradient. A step that does not is the original's `.detach()`ed UNet output: the sampler's
update stays differentiable, so gradient still flows along the latent path, but none enters the denoiser
there. Strategies (`truncation_strategy`): fixed, per_step_uniform (the 2023 code), uniform (the paper's
"K ~ U(0, 50)"), gaussian (the 2024 default), full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alignprop.errors import UserError

STRATEGIES = ("fixed", "per_step_uniform", "uniform", "gaussian", "full")
GAUSSIAN_MAX_DRAWS = 1000
GAUSSIAN_MIN_PROBABILITY = 1e-3  # refuse settings where a valid cut is rarer than this


@dataclass(frozen=True)
class Truncation:
    """Which denoiser calls keep their gradient, drawn afresh for every micro-batch by `draw`."""

    strategy: str
    steps: int
    cut: int = 0  # fixed: steps i < cut are detached
    minmax: tuple[int, int] = (0, 50)  # per_step_uniform / uniform: inclusive range of the cut
    gaussian_mean: float = 42.0
    gaussian_std: float = 5.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown truncation strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        if self.steps < 1:
            raise UserError(f"steps must be at least 1, got {self.steps}")
        if self.strategy == "fixed" and not 0 <= self.cut <= self.steps:
            raise UserError(f"trunc_backprop_timestep={self.cut} must lie in [0, steps={self.steps}]")
        low, high = self.minmax
        if self.strategy in ("per_step_uniform", "uniform") and not 0 <= low <= high <= self.steps:
            raise UserError(
                f"truncated_backprop_minmax={tuple(self.minmax)} must satisfy 0 <= min <= max <= steps={self.steps}"
            )
        if self.strategy == "gaussian":
            self._validate_gaussian()

    def _validate_gaussian(self) -> None:
        if self.steps < 2:
            raise UserError("gaussian truncation needs steps >= 2 (its cut lies in [1, steps - 1])")
        if not self.gaussian_std > 0:
            raise UserError(f"truncation_gaussian_std must be positive, got {self.gaussian_std}")
        # int() truncates toward zero, so the cut lands in [1, T-1] iff the draw lies in [1, T).
        if self._gaussian_cdf(self.steps) - self._gaussian_cdf(1) < GAUSSIAN_MIN_PROBABILITY:
            raise UserError(
                f"gaussian truncation N({self.gaussian_mean}, {self.gaussian_std}) almost never gives a cut in "
                f"[1, {self.steps - 1}] for steps={self.steps}; set truncation_gaussian_mean inside that range"
            )

    def _gaussian_cdf(self, x: float) -> float:
        return 0.5 * (1 + math.erf((x - self.gaussian_mean) / (self.gaussian_std * math.sqrt(2))))

    def cut_probabilities(self) -> dict[int, float]:
        """P(cut = c) (steps i >= c keep their gradient); per_step_uniform: of each step's own cut. The gaussian's
        cut is int(x), x ~ N(mean, std) redrawn until the cut lies in [1, steps - 1]: int(x) = c iff c <= x < c + 1."""
        if self.strategy == "full":
            return {0: 1.0}
        if self.strategy == "fixed":
            return {self.cut: 1.0}
        if self.strategy in ("uniform", "per_step_uniform"):
            low, high = self.minmax
            return {cut: 1 / (high - low + 1) for cut in range(low, high + 1)}
        masses = {cut: self._gaussian_cdf(cut + 1) - self._gaussian_cdf(cut) for cut in range(1, self.steps)}
        total = sum(masses.values())
        return {cut: mass / total for cut, mass in masses.items()}

    def draw(self, generator: torch.Generator) -> tuple[bool, ...]:
        """One plan (`keep_grad`): element i is True when step i's denoiser call keeps its gradient."""
        steps = range(self.steps)
        if self.strategy == "full":
            return tuple(True for _ in steps)
        if self.strategy == "per_step_uniform":
            # The original drew a fresh cut at every step; kept steps need not be contiguous.
            low, high = self.minmax
            cuts = torch.randint(low, high + 1, (self.steps,), generator=generator).tolist()
            return tuple(i >= cut for i, cut in zip(steps, cuts))
        cut = self._draw_cut(generator)  # one cut for the whole batch
        return tuple(i >= cut for i in steps)

    def _draw_cut(self, generator: torch.Generator) -> int:
        if self.strategy == "fixed":
            return self.cut
        if self.strategy == "uniform":
            low, high = self.minmax
            return int(torch.randint(low, high + 1, (1,), generator=generator))
        for _ in range(GAUSSIAN_MAX_DRAWS):
            draw = torch.normal(self.gaussian_mean, self.gaussian_std, (1,), generator=generator).item()
            if 1 <= int(draw) <= self.steps - 1:
                return int(draw)
        raise RuntimeError(f"no gaussian cut in [1, {self.steps - 1}] after {GAUSSIAN_MAX_DRAWS} draws")


def truncation_from_config(config) -> Truncation:
    """The truncation described by a config, honouring the original's flags when the strategy is "auto"."""
    strategy = config.truncation_strategy
    if strategy == "auto":
        if not config.truncated_backprop:
            strategy = "full"
        else:
            strategy = "per_step_uniform" if config.truncated_backprop_rand else "fixed"
    return Truncation(
        strategy=strategy,
        steps=config.steps,
        cut=config.trunc_backprop_timestep,
        minmax=tuple(config.truncated_backprop_minmax),
        gaussian_mean=config.truncation_gaussian_mean,
        gaussian_std=config.truncation_gaussian_std,
    )
