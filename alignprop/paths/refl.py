"""ReFL (`gradient_path="refl"`): one denoiser call with gradient late in the chain; its one-step x0 is scored.

Reference: Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image Generation",
arXiv 2304.05977; code `THUDM/ImageReward` `ImageReward/ReFL.py` (40 steps, the trained step `randint(30, 39)`,
`pred_original_sample` scored), and FlowBP's re-implementation for flow matching, `RuoyuWang-2077/FlowBP` @ 93b220a
`flowbp/trainers/sd35/refl.py` (and `flux1/refl.py`):

- k ~ U{min..max} (`gradient_paths.refl.last_steps`; ImageReward's 1..10 of 40 steps, FlowBP's 1..11 of 25,
  sd35/refl.py:48-55);
- sample without gradient up to step T - k (sd35/refl.py:57-77), the latents detached there;
- one denoiser call there with gradient; the clean latents it predicts (the scheduler's x0; x - sigma v for flow
  matching, sd35/refl.py:79-98) are decoded and scored;
- the unconditional half of classifier-free guidance runs without gradient (FlowBP's `cfg_detach_neg: true`,
  sd35/leapalign.py:185-198, which its SD3.5 configs set for the baselines): the gradient is guidance_scale times
  the conditional call's. `gradient_paths.refl.uncond_gradient=True` keeps both halves' (the batched call's) gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignprop.errors import UserError
from alignprop.paths.base import Branch, Calls, GradientPath, Plan, flags, rollout, uniform_int, uniform_mean
from alignprop.sampling import guided_prediction


@dataclass(frozen=True)
class ReflPlan(Plan):
    step: int = 0

    def record(self) -> dict:
        return {"step": self.step}


class ReFL(GradientPath):
    name = "refl"
    reference = "ReFL, arXiv 2304.05977; THUDM/ImageReward ImageReward/ReFL.py; FlowBP flowbp/trainers/sd35/refl.py"

    def __init__(self, config, family: str = ""):
        super().__init__(config, family)
        knobs = config.gradient_paths.refl
        self.last_steps, self.uncond_gradient = tuple(knobs.last_steps), knobs.uncond_gradient

    @staticmethod
    def check(config) -> None:
        low, high = config.gradient_paths.refl.last_steps
        if not 1 <= low <= high <= config.steps:
            raise UserError(
                f"gradient_paths.refl.last_steps={(low, high)} must satisfy 1 <= min <= max <= steps={config.steps} "
                "(k-th step from the end; 1 = the last)"
            )

    def plan(self, step: int) -> ReflPlan:
        return ReflPlan(flags(self.steps, {step}), step)

    def denoiser_calls(self, plan) -> Calls:
        # the sampler without gradient up to the trained step, then that step's one guided prediction
        return Calls(0, plan.step) + self.guided_calls(1, self.uncond_gradient)

    def expected_calls(self) -> Calls:
        low, high = self.last_steps
        return uniform_mean([self.denoiser_calls(self.plan(self.steps - k)) for k in range(low, high + 1)])

    def draw(self, random, model, latents) -> ReflPlan:
        low, high = self.last_steps
        return self.plan(self.steps - uniform_int(low, high, random.plans))

    def sample(self, model, conditioning, latents, plan, options, start=0, generator=None):
        latents = rollout(model, conditioning, latents, options, start, plan.step, generator)
        timestep = model.set_timesteps(options.steps, latents.device)[plan.step]
        prediction = guided_prediction(model, latents, timestep, conditioning, options, self.uncond_gradient)
        return [Branch("x0", model.denoised(prediction, timestep, latents))]
