"""DRaFT-LV (`gradient_path="draft_lv"`): the K=1 sample plus n re-noisings of it, each denoised with gradient.

Reference: Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards", arXiv 2309.17400;
the reference code is FlowBP's re-implementation, `RuoyuWang-2077/FlowBP` @ 93b220a `flowbp/trainers/sd35/draft_lv.py`
(and `flux1/draft_lv.py`):

- the sample with K=1: every step without gradient but the last (sd35/draft_lv.py:37-78);
- n (`gradient_paths.draft_lv.renoise`, 2) re-noisings of its stop-gradient final latents to the last timestep's
  level, each denoised by one deterministic step with gradient (sd35/draft_lv.py:88-114);
- the n + 1 images scored and their losses **averaged** (one batch of (1 + n) B images, then the mean:
  sd35/draft_lv.py:116, sd35/leapalign.py:483); `gradient_paths.draft_lv.combine="sum"` sums them instead (n + 1
  times the gradient, which then meets the clipping threshold sooner);
- the unconditional half of classifier-free guidance without gradient, as FlowBP's configs run it
  (`gradient_paths.draft_lv.uncond_gradient=True` keeps it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignprop.errors import UserError
from alignprop.paths.base import Branch, Calls, GradientPath, Plan, flags, fresh_noise, one_step
from alignprop.sampling import sample

COMBINE = ("mean", "sum")


@dataclass(frozen=True)
class DraftLvPlan(Plan):
    noises: tuple[torch.Tensor, ...] = field(default=(), repr=False, compare=False)

    def record(self) -> dict:
        return {"trained_steps": self.trained_steps(), "renoised": len(self.noises)}


class DraftLv(GradientPath):
    name = "draft_lv"
    reference = "DRaFT-LV, arXiv 2309.17400; FlowBP flowbp/trainers/sd35/draft_lv.py"

    def __init__(self, config, family: str = ""):
        super().__init__(config, family)
        knobs = config.gradient_paths.draft_lv
        self.renoise, self.combine, self.uncond_gradient = knobs.renoise, knobs.combine, knobs.uncond_gradient

    @staticmethod
    def check(config) -> None:
        knobs = config.gradient_paths.draft_lv
        if knobs.renoise < 1:
            raise UserError(f"gradient_paths.draft_lv.renoise must be >= 1 re-noisings, got {knobs.renoise}")
        if knobs.combine not in COMBINE:
            raise UserError(f"gradient_paths.draft_lv.combine={knobs.combine!r}; choose one of: {', '.join(COMBINE)}")

    def denoiser_calls(self, plan) -> Calls:
        return self.calls(len(plan.noises))

    def expected_calls(self) -> Calls:
        return self.calls(self.renoise)

    def calls(self, renoised: int) -> Calls:
        """The steps before the last without gradient; the last and each re-noising's step with it."""
        return Calls(0, self.steps - 1) + self.guided_calls(1 + renoised, self.uncond_gradient)

    def plan(self, noises) -> DraftLvPlan:
        return DraftLvPlan(flags(self.steps, {self.steps - 1}), tuple(noises))

    def draw(self, random, model, latents) -> DraftLvPlan:
        return self.plan(fresh_noise(model, latents, random.latents) for _ in range(self.renoise))

    def sample(self, model, conditioning, latents, plan, options, start=0, generator=None):
        uncond = self.uncond_gradient
        final = sample(model, conditioning, latents, plan.trained, options, generator, start, uncond_gradient=uncond)
        last = model.set_timesteps(options.steps, latents.device)[-1]
        weight = 1.0 / (1 + len(plan.noises)) if self.combine == "mean" else 1.0
        branches = [Branch("final", final, weight)]
        for index, noise in enumerate(plan.noises):
            noisy = model.add_noise(final.detach(), noise.to(final.dtype), last)
            stepped = one_step(model, conditioning, noisy, last, options, uncond)
            branches.append(Branch(f"renoised_{index + 1}", stepped, weight))
        return branches
