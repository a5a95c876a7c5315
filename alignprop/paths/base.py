"""The gradient-path interface: what one micro-batch's sampling pass hands to the reward, and with which weights.

A gradient path decides which denoiser calls of a training sample carry the reward's gradient and what is
decoded and scored. The Trainer uses every path the same way, for every micro-batch:

1. `draw(random, model, latents)` -> a `Plan`: every random choice of the micro-batch (trained steps, noise
   levels, extra noise), drawn when the micro-batch is drawn, from the trainer's streams only (`plans` for
   indices and levels, `latents` for noise), so runs stay reproducible and resumable and the draws do not
   depend on when the sampling runs.
2. `gradient_free_steps(plan)`: how many leading sampler steps are plain steps without gradient. The no-grad
   prefix (`alignprop.prefix`, `train.no_grad_batch_size`) may run those for many micro-batches at once and
   hand the latents over at that step (`start`).
3. `sample(model, conditioning, latents, plan, options, start, generator)` -> the `Branch`es: latents to decode
   and score, each with its loss weight. The Trainer decodes, scores and shapes the loss of each branch and
   sums them with their weights.

A path gets the model's family (its schedule hooks: `set_timesteps`, `step`, `denoised`, `add_noise`, ...), the
sampling options and its plan; never the Trainer.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch

from alignprop.prefix import prefix_length
from alignprop.rewards.base import RewardResult
from alignprop.rewards.relative import Relative
from alignprop.sampling import SamplingOptions, guided_prediction, initial_latents, sample


@dataclass(frozen=True)
class Branch:
    """Latents to decode and score, with their loss weight (a number, or one per sample).

    `name` says what was scored ("final": the finished sample; "x0": a one-step prediction of it; ...), and
    is what metrics.jsonl logs the branch's reward under. `inverted`: scored with the reward negated (SRPO's
    inversion branch; a relative reward has its two phrases swapped instead). `positive_boost`: SRPO's discount
    k inside a relative reward, (1 + k) positive - negative (ignored by other rewards)."""

    name: str
    latents: torch.Tensor
    weight: float | torch.Tensor = 1.0
    inverted: bool = False
    positive_boost: float = 0.0


@dataclass(frozen=True)
class Plan:
    """The random choices of one micro-batch. `trained[i]`: step i's denoiser call carries gradient (0 = first,
    noisiest). Paths subclass it with their own draws; `record()` is what metrics.jsonl logs of it."""

    trained: tuple[bool, ...]

    def trained_steps(self) -> list[int]:
        return [step for step, keeps in enumerate(self.trained) if keeps]

    def record(self) -> dict:
        return {"trained_steps": self.trained_steps()}


class GradientPath(abc.ABC):
    """One gradient path. Subclasses set `name` and `reference` and implement `draw` and `sample`."""

    name: ClassVar[str] = ""
    reference: ClassVar[str] = ""  # the paper and the reference code file it follows

    def __init__(self, config, family: str = ""):
        self.steps = config.steps
        self.family = family  # the model family's name ("sd", "sdxl", "sd3", "flux"; "" when unknown)
        nested = config.gradient_paths.get(self.name)  # the knobs of a path configured as its own section
        self.knobs = nested.to_dict() if hasattr(nested, "to_dict") else {}

    def settings(self) -> dict:
        """What the start-up line shows of this path's settings (its own section's knobs, by default)."""
        return dict(self.knobs)

    def describe(self) -> str:
        """The start-up line: the path, its settings and its reference."""
        settings = ", ".join(f"{key}={value}" for key, value in self.settings().items())
        return f"gradient path: {self.name} ({settings}); reference: {self.reference}"

    @staticmethod
    def check(config) -> None:
        """One UserError line for the first setting of this path the run cannot honour (none by default)."""
        return None

    def check_model(self, model) -> None:
        """One UserError line when the path cannot run on `model`'s family (called once the model is loaded,
        before the run directory exists; every family by default)."""
        return None

    @abc.abstractmethod
    def draw(self, random, model, latents: torch.Tensor) -> Plan:
        """Every random choice of one micro-batch, from the trainer's streams."""

    def gradient_calls(self, plan: Plan) -> int:
        """Denoiser calls with gradient per sample (a guided call over [uncond; cond] counts once)."""
        return len(plan.trained_steps())

    def gradient_free_steps(self, plan: Plan) -> int:
        """Leading sampler steps without gradient (the steps before the first trained one, by default)."""
        return prefix_length(plan.trained)

    @abc.abstractmethod
    def sample(self, model, conditioning, latents, plan: Plan, options: SamplingOptions, start=0, generator=None):
        """The micro-batch's branches (a list of `Branch`); `latents` are those at step `start`."""


# --- pieces several paths share ------------------------------------------------------------------------------


def flags(steps: int, trained) -> tuple[bool, ...]:
    """`trained` (step indices) as a per-step tuple of booleans."""
    return tuple(step in trained for step in range(steps))


def rollout(model, conditioning, latents, options, start=0, stop=None, generator=None) -> torch.Tensor:
    """The sampler from step `start` to step `stop` (default: the end) without gradient."""
    with torch.no_grad():
        return sample(model, conditioning, latents, (False,) * options.steps, options, generator, start, stop=stop)


def one_step(model, conditioning, latents, timestep, options, uncond_gradient=True):
    """One deterministic sampler step whose denoiser call keeps its gradient."""
    prediction = guided_prediction(model, latents, timestep, conditioning, options, uncond_gradient)
    return model.step(prediction, timestep, latents, eta=0.0)


def fresh_noise(model, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise drawn as the starting latents are (scaled by init_noise_sigma, 1 for DDIM and flow
    matching; packed for FLUX), from `generator`."""
    return initial_latents(latents.shape[0], model, generator, latents.device).to(latents.dtype)


def uniform_int(low: int, high: int, generator: torch.Generator) -> int:
    """An integer ~ U{low..high} (inclusive) from `generator`."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def score(reward, branch: Branch, images: torch.Tensor, prompts: list[str]):
    """The branch's RewardResult. A relative reward (SRPO's) scores with the branch's boost, its phrases swapped
    when `inverted`; any other reward is negated when `inverted`."""
    if isinstance(reward, Relative):
        return reward.score(images, prompts, positive_boost=branch.positive_boost, swapped=branch.inverted)
    result = reward.score(images, prompts)
    return negated(result) if branch.inverted else result


def negated(result: RewardResult) -> RewardResult:
    """The reward with its sign flipped (loss -> -loss, reward -> -reward): SRPO scores its inversion branch
    with the relative reward's two prompts swapped, gradient descent where the denoise branch ascends."""
    return RewardResult(-result.loss, -result.reward, result.metrics)
