"""LeapAlign (`gradient_path="leapalign"`): two trained steps k < j; k's prediction leaps straight to step j, the leap
is connected to the true latents there with a straight-through estimator, and j's one-step x0 carries the gradient
of the finished sample, each sample weighted by how close the leap and the one-step x0 came to the true chain.

Reference: Liang et al. 2026, "LeapAlign: Post-Training Flow Matching Models at Any Generation Step by Building
Two-Step Trajectories", arXiv 2604.15311 (code `RockeyCoss/LeapAlign_Code`); the reference code is FlowBP's
re-implementation, `RuoyuWang-2077/FlowBP` @ 93b220a `flowbp/trainers/sd35/leapalign.py` (S) and
`flowbp/trainers/flux1/leapalign.py` (F), the same algorithm line for line, with its final configs
`configs/final/{sd35,flux1}/*_leapalign.yaml` (alpha 0.3, tau 0.1; SD3.5 with both CFG halves under gradient):

- (k, j) once per micro-batch, shared by its samples: two distinct reverse indices uniform over all steps
  (`sample_jk_indices`, `common/jk_sampling.py:63-74`; `alignprop.paths.step_draws.leap_pair`); only the denoiser
  calls at k and j keep their gradient (S:322-331, F:221-229), every other step runs without it;
- at k the leap x_hat_j = x_k + (sigma_j - sigma_k) v_k (`jump_to_step`, S:364-366, F:264-271), then the ordinary
  step k -> k+1 with the prediction detached (S:367, F:272);
- at j: d_j = mean |x_hat_j - x_j| per sample over the non-batch dims (float64, no gradient; S:332-340,
  F:232-238); the connector x_c = x_hat_j + sg(x_j - x_hat_j) (S:342, F:240); the denoiser sees
  alpha x_c + (1 - alpha) sg(x_c) (S:343-349, F:241-247); x0_hat = x_c - sigma_j v_j, the chain going on from
  sg(x_c + (sigma_{j+1} - sigma_j) v_j) without gradient to the end, x_N (S:368-376, F:273-281);
- d_0 = mean |x0_hat - x_N| per sample, w = 1 / (max(d_j, tau) + max(d_0, tau)), no gradient (S:387-393,
  F:292-298); the scored latents are x0_hat + sg(x_N - x0_hat): the finished sample's value, gradient into x0_hat
  (S:411, F:308); the per-sample loss times w (S:474-476; F:375-378 divides by the denominator, the same weight).

Written with the family's schedule hooks, so the definition carries over to DDIM families (SD 1.x/2.x, SDXL)
unchanged: the leap is the deterministic jump from k's predicted clean latents and the noise it implies to j's
level, `add_noise(x0_k, implied_noise(x0_k, t_k, x_k), t_j)` (DDIM from alpha_bar_k straight to alpha_bar_j; for
flow matching sigma_j (x_k + (1 - sigma_k) v_k) + (1 - sigma_j)(x_k - sigma_k v_k) = x_k + (sigma_j - sigma_k) v_k,
the Euler leap, equal to float rounding), and x0_hat is `denoised` (DDIM's pred_original_sample).

Differences from the reference, none in the gradient: the straight-through sums are written so that their values
are exact (x_j + (x_hat_j - sg(x_hat_j)), sg(x_c) + alpha (x_c - sg(x_c)), x_N + (x0_hat - sg(x0_hat)): the same
gradients), so the chain after j and the scored latents are bit-for-bit the plain sample from the same noise (the
reference's sums are off by float rounding there); everything runs in the run's dtype, without the reference's
bf16 casts. `uncond_gradient=False` keeps the unconditional CFG half out of the gradient (FlowBP's default
`cfg_detach_neg`, S:185-198; its SD3.5 LeapAlign config turns that off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignprop.errors import UserError
from alignprop.paths.base import Branch, Calls, GradientPath, Plan, flags, rollout
from alignprop.paths.step_draws import leap_pair
from alignprop.sampling import guided_prediction


@dataclass(frozen=True)
class LeapPlan(Plan):
    k: int = 0  # the step whose prediction leaps to j
    j: int = 1  # the step whose one-step x0 carries the gradient

    def record(self) -> dict:
        return {"k": self.k, "j": self.j}


class LeapAlign(GradientPath):
    name = "leapalign"
    reference = "LeapAlign, arXiv 2604.15311; FlowBP flowbp/trainers/sd35/leapalign.py, flux1/leapalign.py"

    def __init__(self, config, family: str = ""):
        super().__init__(config, family)
        knobs = config.gradient_paths.leapalign
        self.alpha = float(knobs.alpha)
        self.tau = float(knobs.tau)
        self.uncond_gradient = bool(knobs.uncond_gradient)

    @staticmethod
    def check(config) -> None:
        if config.steps < 2:
            raise UserError(
                f"gradient_path='leapalign' needs steps >= 2 (two trained steps k < j), got steps={config.steps}"
            )

    def plan(self, k: int, j: int) -> LeapPlan:
        return LeapPlan(flags(self.steps, {k, j}), k, j)

    def denoiser_calls(self, plan) -> Calls:
        return self.expected_calls()  # the same for every plan

    def expected_calls(self) -> Calls:
        # every step once, whatever (k, j): the two at k and j guided with gradient, the others without
        return Calls(0, self.steps - 2) + self.guided_calls(2, self.uncond_gradient)

    def draw(self, random, model, latents) -> LeapPlan:
        return self.plan(*leap_pair(self.steps, random.plans))

    def sample(self, model, conditioning, latents, plan, options, start=0, generator=None):
        k, j, eta = plan.k, plan.j, options.eta
        timesteps = model.set_timesteps(options.steps, latents.device)
        at_k = rollout(model, conditioning, latents, options, start, k, generator)
        prediction = guided_prediction(model, at_k, timesteps[k], conditioning, options, self.uncond_gradient)
        leap = leap_to(model, prediction, timesteps[k], at_k, timesteps[j])
        after_k = model.step(prediction.detach(), timesteps[k], at_k, eta=eta, generator=generator)
        at_j = rollout(model, conditioning, after_k, options, k + 1, j, generator)

        with torch.no_grad():
            d_j = mean_distance(leap, at_j)
        connected = at_j + (leap - leap.detach())  # value at_j exactly, gradient into the leap
        mixed = connected.detach()
        if self.alpha > 0:
            mixed = mixed + self.alpha * (connected - connected.detach())  # value at_j, gradient alpha
        prediction = guided_prediction(model, mixed, timesteps[j], conditioning, options, self.uncond_gradient)
        clean = model.denoised(prediction, timesteps[j], connected)
        with torch.no_grad():
            after_j = model.step(prediction, timesteps[j], at_j, eta=eta, generator=generator)
        final = rollout(model, conditioning, after_j, options, j + 1, generator=generator)

        with torch.no_grad():
            d_0 = mean_distance(clean, final)
            weight = 1.0 / (d_j.clamp(min=self.tau) + d_0.clamp(min=self.tau))
        scored = final + (clean - clean.detach())  # value: the finished sample; gradient into x0_hat
        return [Branch("final", scored, weight.to(latents.dtype))]


def leap_to(model, prediction, timestep, latents, target):
    """The latents at `target`'s level implied by `prediction` at `timestep`: its clean latents and the noise they
    imply put together at the target level (flow matching: the Euler leap x + (sigma' - sigma) v)."""
    clean = model.denoised(prediction, timestep, latents)
    return model.add_noise(clean, model.implied_noise(clean, timestep, latents), target)


def mean_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute difference over the non-batch dims, in float64."""
    return (a.double() - b.double()).abs().mean(dim=tuple(range(1, a.ndim)))
