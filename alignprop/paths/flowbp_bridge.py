"""FlowBP-Bridge (`gradient_path="flowbp_bridge"`): FlowBP-Sparse cut at a drawn step j, bridged there with a
straight-through connector whose gradient also enters j's denoiser through its input (scaled by alpha).

Reference: FlowBP, arXiv 2606.11075; `RuoyuWang-2077/FlowBP` @ 93b220a `flowbp/trainers/sd35/flowbp_bridge.py` (S)
and `flowbp/trainers/flux1/flowbp_bridge.py` (F), final configs `configs/final/sd35/sd3_5_flowbp_bridge.yaml:50-62`
and `configs/final/flux1/flux1_flowbp_bridge.yaml:42-51`:

- the rollout x_0..x_N and its velocities without gradient (sd35/flowbp_lagrange.py:29-67);
- (k, j) (`sample_jk_indices`, common/jk_sampling.py:187-222; `jk_sampling`, uniform in both configs; k only
  consumes draws) (S:201, F:223); the K = `num_active_steps` budget split between [0, j) and [j, N)
  (`_allocate_flowbp_bridge_active_counts`, S:60-98, F:79-117: `split_active`); A_pre late-biased over [0, j),
  weights (i + 1)^bias; A_post = j and late-biased steps of (j, N), weights (i - j)^bias (S:101-138, 223-237;
  F:120-164, 246-260); gamma as in Sparse over A_pre + A_post (S:239-250, F:262-273);
- x_j_hat = x_0 + sum_{i<j} d_i u_i, u_i = grad_scale(v_i(x_i), gamma) on A_pre, cached elsewhere; x_j_conn =
  x_j_hat + sg(x_j - x_j_hat); j's denoiser sees alpha x_j_conn + (1 - alpha) sg(x_j_conn) (S:252-280, F:275-301);
- x0_hat = x_j_conn + sum_{i>=j} d_i u_i, u_j = grad_scale(v_j(that input), gamma), the other A_post velocities at
  their detached x_i (S:282-304, F:303-324); scored: x0_hat + sg(x_N - x0_hat) (S:305-307, F:325-326), weight 1
  (S:319-322).
  Gradient: G + gamma sum_{A_post} d_i dv_i + gamma d_j alpha (dv_j/dx) G, G = gamma sum_{A_pre} d_i dv_i.

Here: the terms without gradient are not formed (the straight-throughs discard the estimates' values) and the
connectors are written with exact values (x_j + (x_j_hat - sg(x_j_hat)), grad_scale(x_j_conn, alpha), x_N +
(x0_hat - sg(x0_hat))), so j's denoiser sees exactly x_j and the scored latents are bit for bit the no-grad sample.
The draws come from the trainer's `plans` stream (per process), not FlowBP's generator seeded 114 and shared by all
ranks; its window is all steps (the configs' min_idx 1, max_idx N + 1, no tail ratio). Known differences, none in the
float64 gradient: no bf16 casts (FlowBP casts x_j_conn and x0_conn to bf16 on SD3.5) and no bf16 rounding of the
timestep. `uncond_gradient` (False: `cfg_detach_neg: true`) keeps the unconditional CFG half's gradient (SD3; FLUX.1
has no CFG). `late_bias`, `grad_rescale` and `alpha` differ between FlowBP's SD3.5 and FLUX.1 configs: -1 takes the
model family's (`FAMILY_VALUES`).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignprop.errors import UserError
from alignprop.paths.base import Branch, Calls, GradientPath, Plan, flags
from alignprop.paths.flowbp_common import (
    PairDraw,
    check_auto_or_at_least,
    check_flow_model,
    check_pair_knobs,
    family_value,
    grad_scale,
    rescale_factor,
    rollout,
    rollout_calls,
    straight_through,
)
from alignprop.paths.step_draws import late_biased_steps
from alignprop.sampling import guided_prediction

# FlowBP's final configs: configs/final/sd35/sd3_5_flowbp_bridge.yaml:56-62 ("sd3"), flux1_flowbp_bridge.yaml:46-51
# ("flux", and any other family). num_active_steps (5) and jk_sampling (uniform) are the same in both.
FAMILY_VALUES = {
    "sd3": {"late_bias": 4.0, "grad_rescale": 0.0, "alpha": 0.5},
    "flux": {"late_bias": 2.0, "grad_rescale": 1.0, "alpha": 0.1},
}


@dataclass(frozen=True)
class BridgePlan(Plan):
    k: int = 0
    j: int = 0  # the bridged step
    before: tuple[int, ...] = ()  # A_pre: active steps of [0, j)
    after: tuple[int, ...] = ()  # A_post: j and active steps of (j, N)

    def record(self) -> dict:
        return {"k": self.k, "j": self.j, "active_before_j": list(self.before), "active_from_j": list(self.after)}


class FlowBPBridge(GradientPath):
    name = "flowbp_bridge"
    reference = "FlowBP, arXiv 2606.11075; RuoyuWang-2077/FlowBP @ 93b220a flowbp/trainers/sd35/flowbp_bridge.py"

    def __init__(self, config, family: str = ""):
        super().__init__(config, family)
        knobs = config.gradient_paths.flowbp_bridge
        self.num_active_steps = int(knobs.num_active_steps)
        self.late_bias = float(family_value(knobs.late_bias, FAMILY_VALUES, family, "late_bias"))
        self.grad_rescale = float(family_value(knobs.grad_rescale, FAMILY_VALUES, family, "grad_rescale"))
        self.alpha = float(family_value(knobs.alpha, FAMILY_VALUES, family, "alpha"))
        self.pairs = PairDraw.from_knobs(knobs, knobs.max_j_reverse)
        self.uncond_gradient = knobs.uncond_gradient

    @staticmethod
    def check(config) -> None:
        knobs = config.gradient_paths.flowbp_bridge
        check_pair_knobs(config, "flowbp_bridge")
        if knobs.num_active_steps < 2:
            raise UserError(
                f"gradient_paths.flowbp_bridge.num_active_steps={knobs.num_active_steps} must be >= 2 "
                "(at least one active step on each side of j)"
            )
        check_auto_or_at_least(knobs, "flowbp_bridge", "late_bias", 0)
        check_auto_or_at_least(knobs, "flowbp_bridge", "grad_rescale", 0)
        check_auto_or_at_least(knobs, "flowbp_bridge", "alpha", 0)
        if knobs.alpha > 1:
            raise UserError(f"gradient_paths.flowbp_bridge.alpha={knobs.alpha} must lie in [0, 1] (or -1)")

    def check_model(self, model) -> None:
        check_flow_model(self.name, model)

    def plan(self, k: int, j: int, before, after) -> BridgePlan:
        before, after = tuple(sorted(set(before))), tuple(sorted(set(after)))
        if not (0 <= k < j < self.steps and before and all(0 <= i < j for i in before)):
            raise UserError(f"flowbp_bridge: need 0 <= k < j < {self.steps} and active steps before j, got {k}, {j}")
        if not after or after[0] != j or after[-1] >= self.steps:
            raise UserError(f"flowbp_bridge: the active steps from j={j} must start at j, got {list(after)}")
        return BridgePlan(flags(self.steps, set(before) | set(after)), k, j, before, after)

    def denoiser_calls(self, plan) -> Calls:
        return rollout_calls(self, len(plan.before) + len(plan.after))

    def expected_calls(self) -> Calls:
        # split_active shares one budget between the two sides of j, whatever k and j
        steps = self.steps
        return self.pairs.mean(
            steps, lambda k, j: rollout_calls(self, sum(split_active(self.num_active_steps, j, steps - j)))
        )

    def draw(self, random, model, latents) -> BridgePlan:
        steps, generator = self.steps, random.plans
        k, j = self.pairs.draw(steps, generator)
        count_before, count_after = split_active(self.num_active_steps, j, steps - j)
        before = late_biased_steps(j, count_before, self.late_bias, generator)
        after = [j]
        if count_after > 1:
            after += [j + 1 + i for i in late_biased_steps(steps - j - 1, count_after - 1, self.late_bias, generator)]
        return self.plan(k, j, before, after)

    def sample(self, model, conditioning, latents, plan, options, start=0, generator=None):
        j = plan.j
        cache = rollout(model, conditioning, latents, options, start, generator, keep_latents=plan.before + plan.after)
        deltas = [cache.delta(step) for step in range(options.steps)]
        gamma = rescale_factor(deltas, [deltas[i] for i in plan.before + plan.after], self.grad_rescale)

        def term(step, model_input):
            v = guided_prediction(
                model, model_input, cache.timesteps[step], conditioning, options, self.uncond_gradient
            )
            return deltas[step] * grad_scale(v, gamma)

        x_j_hat = sum(term(i, cache.latents[i]) for i in plan.before)  # less its terms without gradient
        x_j = straight_through(x_j_hat, cache.latents[j])
        j_input = grad_scale(x_j, self.alpha)
        x0_hat = x_j + sum(term(i, j_input if i == j else cache.latents[i]) for i in plan.after)
        return [Branch("final", straight_through(x0_hat, cache.final))]


def split_active(total: int, before: int, after: int) -> tuple[int, int]:
    """The active-step budget split between the `before` steps of [0, j) and the `after` of [j, N), each side at
    least one: in proportion (Python's round, half to even), then clamped, what is left over given to the side
    before j first (`_allocate_flowbp_bridge_active_counts`, sd35/flowbp_bridge.py:60-98)."""
    total = min(total, before + after)
    if before < 1 or after < 1 or total < 2:
        raise ValueError(f"FlowBP-Bridge needs two active steps and both sides of j, got {total}, {before}, {after}")
    first = min(max(int(round(total * before / float(before + after))), 1), before)
    second = total - first
    if second < 1:
        second, first = 1, total - 1
    if second > after:
        second, first = after, total - after
    first, second = min(max(first, 1), before), min(max(second, 1), after)
    missing = total - first - second
    if missing > 0:
        added = min(missing, before - first)
        first, missing = first + added, missing - added
    if missing > 0:
        second += min(missing, after - second)
    return first, second
