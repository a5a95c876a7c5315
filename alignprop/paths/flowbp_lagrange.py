"""FlowBP-Lagrange (`gradient_path="flowbp_lagrange"`): two drawn steps k < j; the flow from k to j and from j to the
end is integrated by a Lagrange quadrature over sigma on a few of the cached velocities, the starting (and the
next) support's velocity with gradient; straight-through connectors at j and at the end, each sample weighted by
how close the two quadratures came to the true chain.

Reference: FlowBP, arXiv 2606.11075; `RuoyuWang-2077/FlowBP` @ 93b220a `flowbp/trainers/sd35/flowbp_lagrange.py` (S)
and `flowbp/trainers/flux1/flowbp_lagrange.py` (F), helpers `flowbp/trainers/common/flowbp_lagrange_utils.py` (LU),
final configs `configs/final/sd35/sd3_5_flowbp_lagrange.yaml:51-71` and
`configs/final/flux1/flux1_flowbp_lagrange.yaml:42-61`:

- the rollout x_0..x_N and its velocities without gradient (S:29-67, F:484-560); (k, j) from the Dirichlet sampler
  (`jk_sampling`; `common/jk_sampling.py:77-132`, S:136, F:591-593; SD3.5 caps j at 10 steps from the end);
- Q(x_a, a, b) = x_a + sum_m w_m u_m over the supports S(a, b): `connector_order` steps of [a, b) spread evenly
  (LU:51-80), w_m = the integral from sigma_a to sigma_b of the m-th Lagrange basis polynomial on their sigmas
  (LU:185-222; "uniform": (sigma_b - sigma_a) / |S|, LU:225-238); u_m: the cached velocity, or for the active
  supports (`grad_support_mode`: the first, first two or all, at most `max_active_supports`, LU:121-164) the
  velocity with gradient, the start's unscaled, the others' gradient times `grad_support_scale` (S:70-109), all of
  them times fac = 1 + r (sum |w| / sum_active |w| - 1), r = `grad_rescale` (LU:241-348);
- v_k at the cached x_k with gradient (S:152-161, F:612-622); x_j_hat = Q(x_k, k, j), blended with the Euler leap
  x_k + (sigma_j - sigma_k) v_k by `anchor_lambda` (1: Q alone) (S:175-204, F:635-673); x_j_conn = x_j_hat +
  sg(x_j - x_j_hat); v_j at alpha x_j_conn + (1 - alpha) sg(x_j_conn) (S:205-225, F:675-718);
  x0_hat = Q(x_j_conn, j, N) (S:239-253, F:731-745); scored: x0_hat + sg(x_N - x0_hat) (S:254, F:747);
- the loss weight w = 1 / (max(d_j, tau) + max(d_0, tau)), d_j = mean |x_j - x_j_hat|, d_0 = mean |x_N - x0_hat| per
  sample in float64, without gradient (S:256-298, F:759-806).

Here: the connectors are written with exact values (x_j + (x_j_hat - sg(x_j_hat)), grad_scale(x_j_conn, alpha),
x_N + (x0_hat - sg(x0_hat))), so j's denoiser sees exactly x_j and the scored latents are bit for bit the no-grad
sample; the weights stay float64 (FlowBP casts them to float32). The draws come from the trainer's `plans` stream (one
(k, j) per micro-batch, per process), not FlowBP's generator seeded 114 and shared by all ranks; the window is all
steps (min_idx 1, max_idx N + 1). Known differences, none in the float64 gradient: no bf16 casts (SD3.5 casts x_j_hat
and x0_hat to bf16 before the straight-throughs and distances) and no bf16 rounding of the timestep. Not ported:
the `adams_bashforth` scheme (SD3.5 only), grad_support_mode "none" (no gradient), `detach_history` and
`debug_connector` (no effect). `uncond_gradient` (False: `cfg_detach_neg: true`) keeps the unconditional CFG half's
gradient (SD3; FLUX.1 has no CFG). `grad_rescale` and `max_j_reverse` differ between FlowBP's SD3.5 and FLUX.1
configs: -1 takes the model family's (`FAMILY_VALUES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignprop.errors import UserError
from alignprop.paths.base import Branch, Calls, GradientPath, Plan, flags
from alignprop.paths.flowbp_common import (
    SUPPORT_MODES,
    WEIGHT_SCHEMES,
    PairDraw,
    active_supports,
    check_auto_or_at_least,
    check_flow_model,
    check_pair_knobs,
    family_value,
    grad_scale,
    interval_supports,
    lagrange_weights,
    rescale_factor,
    rollout,
    rollout_calls,
    straight_through,
    uniform_weights,
)
from alignprop.sampling import guided_prediction

# FlowBP's final configs: configs/final/sd35/sd3_5_flowbp_lagrange.yaml:51-71 ("sd3": jk_dirichlet_max_j_rev 10,
# flowbp_lagrange.grad_rescale absent: the parser's 0.0, flowbp/train_flowbp_flux.py:437-446) and
# configs/final/flux1/flux1_flowbp_lagrange.yaml:42-61 ("flux", and any other family: grad_rescale 0.5, no cap: 0).
FAMILY_VALUES = {
    "sd3": {"grad_rescale": 0.0, "max_j_reverse": 10},
    "flux": {"grad_rescale": 0.5, "max_j_reverse": 0},
}


@dataclass(frozen=True)
class LagrangePlan(Plan):
    k: int = 0
    j: int = 0
    supports_kj: tuple[int, ...] = ()  # S(k, j)
    active_kj: tuple[int, ...] = ()  # its supports whose velocity keeps gradient (k first)
    supports_j0: tuple[int, ...] = ()  # S(j, N)
    active_j0: tuple[int, ...] = ()  # (j first)

    def record(self) -> dict:
        return {
            "k": self.k,
            "j": self.j,
            "supports_kj": list(self.supports_kj),
            "active_kj": list(self.active_kj),
            "supports_j0": list(self.supports_j0),
            "active_j0": list(self.active_j0),
        }


class FlowBPLagrange(GradientPath):
    name = "flowbp_lagrange"
    reference = "FlowBP, arXiv 2606.11075; RuoyuWang-2077/FlowBP @ 93b220a flowbp/trainers/sd35/flowbp_lagrange.py"

    def __init__(self, config, family: str = ""):
        super().__init__(config, family)
        knobs = config.gradient_paths.flowbp_lagrange
        self.alpha = float(knobs.alpha)
        self.tau = float(knobs.tau)
        self.order = int(knobs.connector_order)
        self.support_mode = knobs.grad_support_mode
        self.support_scale = float(knobs.grad_support_scale)
        self.max_active = int(knobs.max_active_supports)
        self.grad_rescale = float(family_value(knobs.grad_rescale, FAMILY_VALUES, family, "grad_rescale"))
        self.weight_scheme = knobs.weight_scheme
        self.anchor_lambda = float(knobs.anchor_lambda)
        cap = family_value(knobs.max_j_reverse, FAMILY_VALUES, family, "max_j_reverse")
        self.pairs = PairDraw.from_knobs(knobs, cap)
        self.uncond_gradient = knobs.uncond_gradient

    @staticmethod
    def check(config) -> None:
        knobs = config.gradient_paths.flowbp_lagrange
        section = "gradient_paths.flowbp_lagrange"
        check_pair_knobs(config, "flowbp_lagrange")
        if knobs.grad_support_mode not in SUPPORT_MODES:
            raise UserError(
                f"{section}.grad_support_mode={knobs.grad_support_mode!r}; choose one of: {', '.join(SUPPORT_MODES)}"
            )
        if knobs.weight_scheme not in WEIGHT_SCHEMES:
            raise UserError(
                f"{section}.weight_scheme={knobs.weight_scheme!r}; choose one of: {', '.join(WEIGHT_SCHEMES)}"
            )
        for key, low, high in (("alpha", 0, 1), ("anchor_lambda", 0, 1)):
            if not low <= knobs[key] <= high:
                raise UserError(f"{section}.{key}={knobs[key]} must lie in [{low}, {high}]")
        if not knobs.tau > 0:
            raise UserError(f"{section}.tau={knobs.tau} must be > 0 (the floor of both distances in the weight)")
        if knobs.connector_order < 1:
            raise UserError(f"{section}.connector_order={knobs.connector_order} must be >= 1 (supports per interval)")
        if knobs.max_active_supports < 0:
            raise UserError(f"{section}.max_active_supports={knobs.max_active_supports} must be >= 0 (0: no limit)")
        if knobs.grad_support_scale < 0:
            raise UserError(f"{section}.grad_support_scale={knobs.grad_support_scale} must be >= 0")
        check_auto_or_at_least(knobs, "flowbp_lagrange", "grad_rescale", 0)

    def check_model(self, model) -> None:
        check_flow_model(self.name, model)

    def plan(self, k: int, j: int) -> LagrangePlan:
        steps = self.steps
        if not 0 <= k < j < steps:
            raise UserError(f"flowbp_lagrange: need 0 <= k < j < {steps}, got k={k}, j={j}")
        supports_kj = tuple(interval_supports(k, j, steps, self.order))
        supports_j0 = tuple(interval_supports(j, steps, steps, self.order))
        active_kj = tuple(active_supports(list(supports_kj), self.support_mode, self.max_active))
        active_j0 = tuple(active_supports(list(supports_j0), self.support_mode, self.max_active))
        trained = {k, j} | set(active_kj) | set(active_j0)
        return LagrangePlan(flags(steps, trained), k, j, supports_kj, active_kj, supports_j0, active_j0)

    def denoiser_calls(self, plan) -> Calls:
        # the whole rollout without gradient; v_k, v_j and each other active support's velocity with it (a
        # quadrature reuses its start's velocity)
        others = len(set(plan.active_kj) - {plan.k}) + len(set(plan.active_j0) - {plan.j})
        return rollout_calls(self, 2 + others)

    def expected_calls(self) -> Calls:
        return self.pairs.mean(self.steps, lambda k, j: self.denoiser_calls(self.plan(k, j)))

    def draw(self, random, model, latents) -> LagrangePlan:
        return self.plan(*self.pairs.draw(self.steps, random.plans))

    def sample(self, model, conditioning, latents, plan, options, start=0, generator=None):
        k, j, steps = plan.k, plan.j, options.steps
        cache = rollout(
            model,
            conditioning,
            latents,
            options,
            start,
            generator,
            keep_latents={k, j} | set(plan.active_kj) | set(plan.active_j0),
            keep_velocities=set(plan.supports_kj) | set(plan.supports_j0),
        )

        def v(step, model_input):
            return guided_prediction(
                model, model_input, cache.timesteps[step], conditioning, options, self.uncond_gradient
            )

        def quadrature(x_start, a, b, support, active, v_a):
            """Q(x_a, a, b): the model's other active supports called here, in support order (S:70-109)."""
            if self.weight_scheme == "uniform":
                weights = uniform_weights(len(support), cache.sigma(a), cache.sigma(b))
            else:
                weights = lagrange_weights([cache.sigma(i) for i in support], cache.sigma(a), cache.sigma(b))
            weights = [float(w) for w in weights]
            velocities = {i: v_a if i == a else grad_scale(v(i, cache.latents[i]), self.support_scale) for i in active}
            factor = 1.0
            if active:
                factor = rescale_factor(weights, [weights[support.index(i)] for i in active], self.grad_rescale)
            delta = 0
            for weight, i in zip(weights, support):
                u = grad_scale(velocities[i], factor) if i in velocities else cache.velocities[i]
                delta = delta + weight * u
            return x_start + delta

        x_k = cache.latents[k]
        v_k = v(k, x_k)
        lagrange_j = quadrature(x_k, k, j, plan.supports_kj, plan.active_kj, v_k)
        if self.anchor_lambda == 1.0:
            x_j_hat = lagrange_j
        else:
            euler_j = x_k + cache.span(k, j) * v_k
            x_j_hat = euler_j if self.anchor_lambda == 0.0 else euler_j + self.anchor_lambda * (lagrange_j - euler_j)
        x_j = straight_through(x_j_hat, cache.latents[j])
        v_j = v(j, grad_scale(x_j, self.alpha))
        x0_hat = quadrature(x_j, j, steps, plan.supports_j0, plan.active_j0, v_j)
        final = straight_through(x0_hat, cache.final)
        weight = similarity_weight(cache.latents[j], x_j_hat, cache.final, x0_hat, self.tau)
        return [Branch("final", final, weight.to(final.dtype))]


def similarity_weight(x_j, x_j_hat, x_n, x0_hat, tau: float) -> torch.Tensor:
    """1 / (max(d_j, tau) + max(d_0, tau)) per sample, d = mean |true - estimate| over the non-batch dims, float64,
    without gradient (S:256-298)."""
    dims = tuple(range(1, x_j.ndim))
    d_j = (x_j.double() - x_j_hat.detach().double()).abs().mean(dims)
    d_0 = (x_n.double() - x0_hat.detach().double()).abs().mean(dims)
    return 1.0 / (d_j.clamp(min=tau) + d_0.clamp(min=tau))
