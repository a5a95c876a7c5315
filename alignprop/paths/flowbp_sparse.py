"""FlowBP-Sparse (`gradient_path="flowbp_sparse"`): one sample without gradient, then K late-biased steps' velocities
again with gradient at their cached latents; the finished sample is scored, its gradient the Euler sum over those K
velocities alone, rescaled.

Reference: FlowBP, arXiv 2606.11075; `RuoyuWang-2077/FlowBP` @ 93b220a `flowbp/trainers/sd35/flowbp_sparse.py` (S)
and `flowbp/trainers/flux1/flowbp_sparse.py` (F), final configs `configs/final/sd35/sd3_5_flowbp_sparse.yaml:56-59`
and `configs/final/flux1/flux1_flowbp_sparse.yaml:46-49`:

- the rollout x_0..x_N and its velocities without gradient (`_rollout_with_cache_sd35`, sd35/flowbp_lagrange.py:29-67);
- A: K = `num_active_steps` distinct steps, drawn without replacement with weights (i + 1)^`late_bias`
  (S:27-63, 133-155; F:57-95, 214-242; `alignprop.paths.step_draws.late_biased_steps`);
- gamma = 1 + r (sum_i |d_i| / sum_{i in A} |d_i| - 1), d_i = sigma_{i+1} - sigma_i, r = `grad_rescale`
  (gamma = 1 at r = 0) (S:157-167, F:244-254);
- v_i again with gradient at the detached x_i for i in A (S:169-182, F:256-271); x0_hat = x_0 + sum_i d_i u_i with
  u_i = grad_scale(v_i, gamma) on A and the cached velocity elsewhere (S:66-93, F:158-186); scored:
  x0_hat + sg(x_N - x0_hat) (S:192-194, F:281-284): the finished sample's value, gradient
  gamma sum_{i in A} d_i dv_i(x_i); the loss weight 1 (S:202-204).

Here: the cached terms of x0_hat carry no gradient and the straight-through discards x0_hat's value, so only the
active terms are formed, and the scored latents are x_N + (x0_hat - sg(x0_hat)): bit for bit the no-grad sample.
The draws come from the trainer's `plans` stream (one draw per micro-batch, per process), not FlowBP's generator
seeded 114 and shared by all ranks. Known differences, none in the float64 gradient: no bf16 casts (FlowBP runs
bf16 latents, casts x0_conn to bf16 on SD3.5 and applies gamma in bf16 on FLUX) and no bf16 rounding of the
timestep; the sigma grid is the family's (`flow_sigmas`). `uncond_gradient` (False: FlowBP's `cfg_detach_neg:
true`) keeps the unconditional CFG half's gradient; FLUX.1 has no CFG. `num_active_steps`, `late_bias` and
`grad_rescale` differ between FlowBP's SD3.5 and FLUX.1 configs: -1 takes the model family's (`FAMILY_VALUES`).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignprop.errors import UserError
from alignprop.paths.base import Branch, Calls, GradientPath, Plan, flags
from alignprop.paths.flowbp_common import (
    check_auto_or_at_least,
    check_flow_model,
    family_value,
    grad_scale,
    rescale_factor,
    rollout,
    rollout_calls,
    straight_through,
)
from alignprop.paths.step_draws import late_biased_count, late_biased_steps
from alignprop.sampling import guided_prediction

# FlowBP's final configs: configs/final/sd35/sd3_5_flowbp_sparse.yaml:56-59 ("sd3"), flux1_flowbp_sparse.yaml:46-49
# ("flux", and any other family).
FAMILY_VALUES = {
    "sd3": {"num_active_steps": 4, "late_bias": 1.0, "grad_rescale": 0.5},
    "flux": {"num_active_steps": 3, "late_bias": 2.0, "grad_rescale": 1.0},
}


@dataclass(frozen=True)
class SparsePlan(Plan):
    active: tuple[int, ...] = ()  # A: the steps whose velocity keeps its gradient

    def record(self) -> dict:
        return {"active_steps": list(self.active)}


class FlowBPSparse(GradientPath):
    name = "flowbp_sparse"
    reference = "FlowBP, arXiv 2606.11075; RuoyuWang-2077/FlowBP @ 93b220a flowbp/trainers/sd35/flowbp_sparse.py"

    def __init__(self, config, family: str = ""):
        super().__init__(config, family)
        knobs = config.gradient_paths.flowbp_sparse
        self.num_active_steps = int(family_value(knobs.num_active_steps, FAMILY_VALUES, family, "num_active_steps"))
        self.late_bias = float(family_value(knobs.late_bias, FAMILY_VALUES, family, "late_bias"))
        self.grad_rescale = float(family_value(knobs.grad_rescale, FAMILY_VALUES, family, "grad_rescale"))
        self.uncond_gradient = knobs.uncond_gradient

    @staticmethod
    def check(config) -> None:
        knobs = config.gradient_paths.flowbp_sparse
        check_auto_or_at_least(knobs, "flowbp_sparse", "num_active_steps", 1)
        check_auto_or_at_least(knobs, "flowbp_sparse", "late_bias", 0)
        check_auto_or_at_least(knobs, "flowbp_sparse", "grad_rescale", 0)

    def check_model(self, model) -> None:
        check_flow_model(self.name, model)

    def plan(self, active) -> SparsePlan:
        active = tuple(sorted(set(active)))
        if not active or not all(0 <= step < self.steps for step in active):
            raise UserError(f"flowbp_sparse: active steps {list(active)} must be some of 0..{self.steps - 1}")
        return SparsePlan(flags(self.steps, set(active)), active)

    def denoiser_calls(self, plan) -> Calls:
        return rollout_calls(self, len(plan.active))

    def expected_calls(self) -> Calls:
        return rollout_calls(self, late_biased_count(self.steps, self.num_active_steps))

    def draw(self, random, model, latents) -> SparsePlan:
        return self.plan(late_biased_steps(self.steps, self.num_active_steps, self.late_bias, random.plans))

    def sample(self, model, conditioning, latents, plan, options, start=0, generator=None):
        cache = rollout(model, conditioning, latents, options, start, generator, keep_latents=plan.active)
        deltas = [cache.delta(step) for step in range(options.steps)]
        gamma = rescale_factor(deltas, [deltas[step] for step in plan.active], self.grad_rescale)
        estimate = 0  # x0_hat less its terms without gradient
        for step in plan.active:
            v = guided_prediction(
                model, cache.latents[step], cache.timesteps[step], conditioning, options, self.uncond_gradient
            )
            estimate = estimate + deltas[step] * grad_scale(v, gamma)
        return [Branch("final", straight_through(estimate, cache.final))]
