"""DRTune (`gradient_path="drtune"`): K spaced steps keep their gradient, with their denoiser input detached,
and the chain stops early at a random step whose one-step x0 is scored.

Reference: Wu et al. 2024, "Deep Reward Supervisions for Tuning Text-to-Image Diffusion Models", arXiv 2405.00760;
the reference code is FlowBP's re-implementation, `RuoyuWang-2077/FlowBP` @ 93b220a
`flowbp/trainers/sd35/drtune.py` (and `flux1/drtune.py`, the same draws), which this module follows:

- early stop (`_sample_drtune_early_stop_idx`, sd35/drtune.py:52-75): E = round(ratio * T)
  (`gradient_paths.drtune.early_stop`, 0.4); m = T - r, r ~ U{1..E} (drawn first); E = 0 runs to the end
  (m = T - 1).
- trained steps (`_sample_equally_spaced_train_indices`, sd35/drtune.py:24-49) over the L = m + 1 steps 0..m:
  stride max(1, L // K), start ~ U{0..L - 1 - (K - 1) * stride} (drawn second; a smaller stride when that is
  negative); all L steps when K >= L. K = `gradient_paths.drtune.train_steps` (3, FlowBP's default).
- every denoiser call sees a detached copy of its input (sd35/drtune.py:110); the calls at trained steps keep their
  gradient, the others run without it; the latent chain itself stays differentiable, so gradient from every
  trained step reaches step m along the sampler's update path.
- at step m the chain stops and the one-step x0 of m's prediction (x_m - sigma_m v_m for flow matching) is scored
  (sd35/drtune.py:137-144). With the early stop off that is the last step's x0 (the finished sample for flow
  matching, where sigma after the last step is 0).
- the unconditional half of classifier-free guidance runs without gradient (`cfg_detach_neg: true` in FlowBP's
  configs, sd35/leapalign.py:185-198); `gradient_paths.drtune.uncond_gradient=True` keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignprop.errors import UserError
from alignprop.paths.base import Branch, Calls, GradientPath, Plan, flags, uniform_int, uniform_mean
from alignprop.sampling import guided_prediction, sample


@dataclass(frozen=True)
class DrtunePlan(Plan):
    stop: int = 0  # m: the step whose one-step x0 is scored

    def record(self) -> dict:
        return {"trained_steps": self.trained_steps(), "stop": self.stop}


class Drtune(GradientPath):
    name = "drtune"
    reference = "DRTune, arXiv 2405.00760; RuoyuWang-2077/FlowBP @ 93b220a flowbp/trainers/sd35/drtune.py"

    def __init__(self, config, family: str = ""):
        super().__init__(config, family)
        knobs = config.gradient_paths.drtune
        self.train_steps, self.early_stop, self.uncond_gradient = (
            knobs.train_steps,
            knobs.early_stop,
            knobs.uncond_gradient,
        )

    @staticmethod
    def check(config) -> None:
        count, ratio = config.gradient_paths.drtune.train_steps, config.gradient_paths.drtune.early_stop
        if not 1 <= count <= config.steps:
            raise UserError(f"gradient_paths.drtune.train_steps={count} must lie in [1, steps={config.steps}]")
        if not 0 <= ratio <= 1:
            raise UserError(
                f"gradient_paths.drtune.early_stop={ratio} must lie in [0, 1] (a fraction of the steps; 0: off)"
            )

    def plan(self, stop: int, trained_steps) -> DrtunePlan:
        return DrtunePlan(flags(self.steps, set(trained_steps)), stop)

    def denoiser_calls(self, plan) -> Calls:
        # steps 0..stop once each (the chain stops at m), the trained ones with gradient
        trained = len(plan.trained_steps())
        return Calls(0, plan.stop + 1 - trained) + self.guided_calls(trained, self.uncond_gradient)

    def expected_calls(self) -> Calls:
        # spaced_steps trains min(K, m + 1) of the steps 0..m whatever its start: only the stop matters
        stops = early_stops(self.steps, self.early_stop)
        return uniform_mean([self.denoiser_calls(self.plan(m, range(min(self.train_steps, m + 1)))) for m in stops])

    def draw(self, random, model, latents) -> DrtunePlan:
        stop = early_stop_step(self.steps, self.early_stop, random.plans)
        return self.plan(stop, spaced_steps(stop + 1, self.train_steps, random.plans))

    def sample(self, model, conditioning, latents, plan, options, start=0, generator=None):
        keep = plan.trained
        before = sample(
            model, conditioning, latents, keep, options, generator, start, True, self.uncond_gradient, stop=plan.stop
        )
        timestep = model.set_timesteps(options.steps, latents.device)[plan.stop]
        with torch.set_grad_enabled(keep[plan.stop] and torch.is_grad_enabled()):
            prediction = guided_prediction(
                model, before.detach(), timestep, conditioning, options, self.uncond_gradient
            )
        return [Branch("x0", model.denoised(prediction, timestep, before))]


def early_stop_span(steps: int, ratio: float) -> int:
    """round(ratio * T), at most T: the early stop's r ranges over 1..span (0: no early stop)."""
    return min(int(round(steps * ratio)), steps)


def early_stop_step(steps: int, ratio: float, generator: torch.Generator) -> int:
    """m = T - r, r ~ U{1..round(ratio * T)}; the last step when that rounds to 0."""
    span = early_stop_span(steps, ratio)
    return steps - 1 if span <= 0 else steps - uniform_int(1, span, generator)


def early_stops(steps: int, ratio: float) -> list[int]:
    """The stops `early_stop_step` draws, equally likely."""
    span = early_stop_span(steps, ratio)
    return [steps - 1] if span <= 0 else [steps - r for r in range(1, span + 1)]


def spaced_steps(length: int, count: int, generator: torch.Generator) -> list[int]:
    """`count` equally spaced steps of 0..length-1 with a random start (all of them when count >= length)."""
    count = min(count, length)
    if count == length:
        return list(range(length))
    stride = max(1, length // count)
    last_start = length - 1 - (count - 1) * stride
    if last_start < 0:
        stride = max(1, (length - 1) // max(1, count - 1))
        last_start = length - 1 - (count - 1) * stride
    start = uniform_int(0, max(0, last_start), generator)
    return [start + i * stride for i in range(count)]
