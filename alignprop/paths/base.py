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

`denoiser_calls(plan)` counts the denoiser calls of a micro-batch with and without gradient (metrics.jsonl logs
`gradient_calls`, the first); `expected_calls()` their mean over the path's plans from its settings alone (the dry run).

A path gets the model's family (its schedule hooks: `set_timesteps`, `step`, `denoised`, `add_noise`, ...), the
sampling options and its plan; never the Trainer.
"""

from __future__ import annotations

import abc
import textwrap
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


@dataclass(frozen=True)
class Calls:
    """Denoiser calls per sample: with gradient and without (a guided call over [uncond; cond] counts once)."""

    with_gradient: float
    without_gradient: float

    def __add__(self, other: Calls) -> Calls:
        return Calls(self.with_gradient + other.with_gradient, self.without_gradient + other.without_gradient)

    def scaled(self, factor: float) -> Calls:
        return Calls(self.with_gradient * factor, self.without_gradient * factor)


def mean_calls(outcomes) -> Calls:
    """The mean of (probability, Calls) pairs whose probabilities sum to 1."""
    return sum((calls.scaled(probability) for probability, calls in outcomes), Calls(0, 0))


def uniform_mean(calls: list[Calls]) -> Calls:
    """The mean of equally likely `Calls`."""
    return mean_calls((1 / len(calls), each) for each in calls)


def runs_guidance(family: str, guidance_scale: float) -> bool:
    """Whether a family's sampler runs classifier-free guidance (`Family.guided`, without the model): never on FLUX
    (its guidance is an input of the model), else at any scale but 1."""
    return family != "flux" and guidance_scale != 1.0


class GradientPath(abc.ABC):
    """One gradient path. Subclasses set `name` and `reference` and implement `draw`, `sample` and `expected_calls`
    (and `denoiser_calls` where the sampler's one call per step does not describe them)."""

    name: ClassVar[str] = ""
    reference: ClassVar[str] = ""  # the paper and the reference code file it follows

    def __init__(self, config, family: str = ""):
        self.steps = config.steps
        self.family = family  # the model family's name ("sd", "sdxl", "sd3", "flux"; "" when unknown)
        nested = config.gradient_paths.get(self.name)  # the knobs of a path configured as its own section
        self.knobs = nested.to_dict() if hasattr(nested, "to_dict") else {}
        self.guided = runs_guidance(family, config.sd_guidance_scale)

    def settings(self) -> dict:
        """What the start-up line shows of this path's settings (its own section's knobs, by default)."""
        return dict(self.knobs)

    def summary(self) -> str:
        """The path and its settings, e.g. "refl (last_steps=(1, 10))" (the start-up line, the model card)."""
        settings = ", ".join(f"{key}={value}" for key, value in self.settings().items())
        return f"{self.name} ({settings})"

    def describe(self) -> str:
        """The start-up lines: the path with its settings (wrapped), then its reference."""
        path = textwrap.fill(
            f"gradient path: {self.summary()}", width=110, subsequent_indent="    ", break_long_words=False
        )
        return f"{path}\nreference: {self.reference}"

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
        return int(self.denoiser_calls(plan).with_gradient)

    def denoiser_calls(self, plan: Plan) -> Calls:
        """The denoiser calls of one micro-batch along `plan` (draw and sample; the no-grad prefix included, run for
        this micro-batch alone: `train.no_grad_batch_size` merges several micro-batches' prefix calls into fewer,
        larger ones), by whether autograd records them. The forward pass only: with `grad_checkpoint` each call with
        gradient runs once more in the backward. By default the sampler's: one call per step, with gradient where
        the plan keeps it."""
        trained = len(plan.trained_steps())
        return Calls(trained, self.steps - trained)

    @abc.abstractmethod
    def expected_calls(self) -> Calls:
        """The mean of `denoiser_calls` over this path's plans, from its settings alone (no model, no latents)."""

    def guided_calls(self, count: int, uncond_gradient: bool) -> Calls:
        """`count` guided predictions with autograd on: with CFG and `uncond_gradient=False` each runs its
        unconditional half in a call of its own without gradient (`guided_prediction`)."""
        return Calls(count, count if self.guided and not uncond_gradient else 0)

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
