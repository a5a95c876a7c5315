"""Direct-Align (`gradient_path="direct_align"`): known noise injected into the finished sample, one denoiser step
with gradient, the clean latents recovered in closed form from the known noise.

Reference: Shen et al. 2025, "Directly Aligning the Full Diffusion Trajectory with Fine-Grained Human Preference"
(SRPO), arXiv 2509.06942; code `Tencent-Hunyuan/SRPO` `fastvideo/SRPO.py`.

The final sample without gradient; known noise (the sample's starting noise, or a fresh draw) injected at the step
whose noise level is nearest u ~ U(min, max); one denoiser step with gradient; x0 recovered from the known noise at
the level reached; the loss weighted by a discount linear in u. Branches (`direct_align_branch`): "denoise" steps
down to the next level; "inversion" (SRPO's second branch) injects the noise at that step's level, steps *up* to
the previous, noisier level with the same prediction and scores the recovered image with the reward's sign flipped
(SRPO's gradient descent on the reward there; the upward step's Jacobian has the opposite sign, so both branches
push the prediction the same way); "both" runs the two from one noise at one evaluated step, each with its own
discount.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignprop.errors import UserError
from alignprop.paths.base import Branch, GradientPath, Plan, flags, fresh_noise, rollout
from alignprop.paths.draft_lv import one_step
from alignprop.sampling import guided_prediction

NOISE_SOURCES = ("initial", "fresh")
BRANCHES = ("denoise", "inversion", "both")


@dataclass(frozen=True)
class DirectAlignPlan(Plan):
    step: int = 0
    level: float = 0.0  # the drawn noise level u
    weight: float = 1.0  # the denoise branch's discount
    inversion_weight: float = 0.0
    noise: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def record(self) -> dict:
        return {
            "step": self.step,
            "level": self.level,
            "weight": self.weight,
            "inversion_weight": self.inversion_weight,
        }


class DirectAlign(GradientPath):
    name = "direct_align"
    reference = "Direct-Align (SRPO), arXiv 2509.06942; Tencent-Hunyuan/SRPO fastvideo/SRPO.py"

    def __init__(self, config, family: str = ""):
        super().__init__(config, family)
        knobs = config.gradient_paths
        self.noise_range = tuple(knobs.direct_align_noise)
        self.discount = tuple(knobs.direct_align_discount)
        self.inversion_discount = tuple(knobs.direct_align_inversion_discount)
        self.branch = knobs.direct_align_branch
        self.noise_source = knobs.direct_align_noise_source

    @staticmethod
    def check(config) -> None:
        knobs, steps = config.gradient_paths, config.steps
        low, high = knobs.direct_align_noise
        if not 0 < low <= high < 1:
            raise UserError(f"gradient_paths.direct_align_noise={(low, high)} must satisfy 0 < min <= max < 1")
        if knobs.direct_align_branch not in BRANCHES:
            raise UserError(
                f"gradient_paths.direct_align_branch={knobs.direct_align_branch!r}; "
                f"choose one of: {', '.join(BRANCHES)}"
            )
        if knobs.direct_align_branch != "denoise" and steps < 3:
            raise UserError(
                f"gradient_paths.direct_align_branch={knobs.direct_align_branch!r} needs steps >= 3 "
                "(the inversion steps up a level, never to pure noise)"
            )
        if knobs.direct_align_noise_source not in NOISE_SOURCES:
            raise UserError(
                f"gradient_paths.direct_align_noise_source={knobs.direct_align_noise_source!r}; "
                f"choose one of: {', '.join(NOISE_SOURCES)}"
            )

    def plan(self, model, level: float, noise, device) -> DirectAlignPlan:
        timesteps = model.set_timesteps(self.steps, device)
        step = nearest_step(model, timesteps, level)
        if self.branch != "denoise":
            step = max(step, first_invertible_step(model, timesteps))
        weight = discount(level, self.noise_range, self.discount)
        inversion_weight = discount(level, self.noise_range, self.inversion_discount)
        return DirectAlignPlan(flags(self.steps, {step}), step, level, weight, inversion_weight, noise)

    def draw(self, random, model, latents) -> DirectAlignPlan:
        low, high = self.noise_range
        level = low + (high - low) * float(torch.rand((), generator=random.plans, dtype=torch.float64))
        noise = latents if self.noise_source == "initial" else fresh_noise(model, latents, random.latents)
        return self.plan(model, level, noise, latents.device)

    def gradient_free_steps(self, plan) -> int:
        return self.steps  # the whole chain runs without gradient

    def sample(self, model, conditioning, latents, plan, options, start=0, generator=None):
        clean = rollout(model, conditioning, latents, options, start, generator=generator)
        timesteps = model.set_timesteps(options.steps, latents.device)
        step, noise = plan.step, plan.noise.to(clean.dtype)
        noisy = model.add_noise(clean, noise, timesteps[step])
        branches = []
        if self.branch in ("denoise", "both"):
            stepped = one_step(model, conditioning, noisy, timesteps[step], options)
            branches.append(Branch("denoise", model.clean_after_step(stepped, noise, timesteps[step]), plan.weight))
        if self.branch in ("inversion", "both"):
            inverted = inversion_step(model, conditioning, noisy, timesteps[step], timesteps[step - 1], options)
            recovered = model.clean_at(inverted, noise, timesteps[step - 1])
            branches.append(Branch("inversion", recovered, plan.inversion_weight, inverted=True))
        return branches


def discount(level: float, noise_range: tuple[float, float], weights: tuple[float, float]) -> float:
    """SRPO's discount: linear in the noise level, weights[0] at the range's low end, weights[1] at its high end."""
    low, high = noise_range
    fraction = 0.0 if high == low else (level - low) / (high - low)
    return weights[0] + (weights[1] - weights[0]) * fraction


def nearest_step(model, timesteps, level: float) -> int:
    """The sampler step whose noise level is nearest `level`."""
    return min(range(len(timesteps)), key=lambda i: abs(model.noise_level(timesteps[i]) - level))


def first_invertible_step(model, timesteps) -> int:
    """The first step an inversion can start from: the level it steps up to must hold some signal (flow
    matching's first level is sigma = 1, pure noise, from which nothing can be recovered)."""
    return 1 if model.noise_level(timesteps[0]) < 1 else 2


def inversion_step(model, conditioning, latents, timestep, noisier_timestep, options):
    """One deterministic step *up* from `timestep`'s level to `noisier_timestep`'s, with gradient: the clean
    latents and the noise that the prediction implies, put back together at the noisier level (DDIM inversion;
    for flow matching this is the Euler step x + (sigma' - sigma) v that SRPO's inversion branch takes)."""
    prediction = guided_prediction(model, latents, timestep, conditioning, options)
    clean = model.denoised(prediction, timestep, latents)
    return model.add_noise(clean, model.implied_noise(clean, timestep, latents), noisier_timestep)
