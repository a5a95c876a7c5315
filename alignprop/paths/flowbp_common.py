"""What the three FlowBP estimators (`flowbp_sparse`, `flowbp_bridge`, `flowbp_lagrange`) share: the no-grad rollout
cache, the gradient-only connectors, the (k, j) draw, the rescale factor and the Lagrange quadrature.

Reference: FlowBP, arXiv 2606.11075; `RuoyuWang-2077/FlowBP` @ 93b220a, `flowbp/trainers/common/` (`jk_sampling.py`,
`flowbp_lagrange_utils.py`) and the rollout cache `flowbp/trainers/sd35/flowbp_lagrange.py:29-67`
(`flowbp/trainers/flux1/flowbp_lagrange.py:484-560`):

- the rollout: x_i and the detached guided velocity v_i of every step, x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i,
  the finished sample x_N; no denoiser call of it keeps gradient. Here it is the plain sampler (`guided_prediction`
  and the family's Euler `step`), so its x_N is bit for bit the no-grad sample from the same latents.
- `grad_scale(x, s)` = sg(x) + s (x - sg(x)) (value x, gradient s times) and `straight_through(estimate, value)`
  = value + (estimate - sg(estimate)) (value `value`, gradient that of `estimate`): the reference's
  `x.detach() + s * (x - x.detach())` and `estimate + (value - estimate).detach()`, written so that the values are
  exact (the reference's are off by float rounding); the gradients are the same.
- the rescale factor 1 + r (total / active - 1) of the sum of |weights| over all terms and over the active ones
  (`flowbp_sparse.py:157-167`, `flowbp_lagrange_utils.py:309-318`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignprop.errors import UserError
from alignprop.families.sd3 import FlowMatching
from alignprop.paths.base import Calls, mean_calls, uniform_mean
from alignprop.paths.step_draws import capped_leap_pair, dirichlet_pair, leap_pair
from alignprop.sampling import guided_prediction

PAIR_MODES = ("uniform", "dirichlet")  # FlowBP's jk_sampling_mode values its final configs use
SUPPORT_MODES = ("start", "midpoint", "all")  # flowbp_lagrange_grad_support_mode (its "none" trains nothing)
WEIGHT_SCHEMES = ("lagrange", "uniform")  # flowbp_lagrange_weight_scheme (its "adams_bashforth": SD3.5 only)
AUTO = -1  # a numeric knob's "the model family's value from FlowBP's final configs"
MEAN_DRAWS = 4096  # Dirichlet draws behind `PairDraw.mean` (standard error: 1/64 of the counts' standard deviation)


# --- settings ------------------------------------------------------------------------------------------------


def family_value(value, table: dict[str, dict], family: str, key: str):
    """`value`, or where it is AUTO the family's value in `table` ("sd3": the SD3.5 config's, else FLUX.1's)."""
    if value != AUTO:
        return value
    return table.get(family, table["flux"])[key]


def check_flow_model(name: str, model) -> None:
    """One UserError line for a DDIM model."""
    if not isinstance(model, FlowMatching):
        raise UserError(
            f"gradient_path={name!r} integrates the flow-matching velocity over sigma and needs an SD3/FLUX model; "
            f"this {model.name} model samples with DDIM: choose another gradient_path"
        )


def check_auto_or_at_least(knobs, section: str, key: str, low: float) -> None:
    value = knobs[key]
    if value != AUTO and value < low:
        raise UserError(
            f"gradient_paths.{section}.{key}={value} must be >= {low:g} (or -1: the model family's FlowBP value)"
        )


@dataclass(frozen=True)
class PairDraw:
    """FlowBP's (k, j) sampler settings (`sample_jk_indices`, jk_sampling.py:187-222) over its configs' window:
    reverse indices [1, T + 1), every step (min_idx 1, max_idx 26 at 25 steps)."""

    mode: str
    concentration: tuple[float, float, float]  # jk_dirichlet_alpha_{a,b,c}
    max_j_reverse: int  # jk_dirichlet_max_j_rev; 0: no cap

    @classmethod
    def from_knobs(cls, knobs, max_j_reverse: int) -> PairDraw:
        alphas = (knobs.dirichlet_alpha_a, knobs.dirichlet_alpha_b, knobs.dirichlet_alpha_c)
        return cls(knobs.jk_sampling, tuple(float(a) for a in alphas), int(max_j_reverse))

    def draw(self, steps: int, generator: torch.Generator) -> tuple[int, int]:
        if self.mode == "dirichlet":
            return dirichlet_pair(steps, self.concentration, generator, self.max_j_reverse)
        if self.max_j_reverse > 0:
            return capped_leap_pair(steps, self.max_j_reverse, generator)
        return leap_pair(steps, generator)

    def mean(self, steps: int, calls_of) -> Calls:
        """The mean of `calls_of(k, j)` over the drawn pairs: exact when it is the same for every pair or the draw is
        uniform (capped or not); else (Dirichlet) Monte-Carlo over MEAN_DRAWS draws of `draw` from a generator
        seeded 0, the same number every time."""
        outcomes = {(k, j): calls_of(k, j) for j in range(steps) for k in range(j)}
        if len(set(outcomes.values())) == 1:
            return next(iter(outcomes.values()))
        if self.mode == "dirichlet":
            generator = torch.Generator().manual_seed(0)
            return uniform_mean([outcomes[self.draw(steps, generator)] for _ in range(MEAN_DRAWS)])
        return mean_calls((self.probability(steps, k, j), calls) for (k, j), calls in outcomes.items())

    def probability(self, steps: int, k: int, j: int) -> float:
        """P(k, j) of the uniform draws: every pair alike (`leap_pair`), or j's reverse index ~ U{1..min(cap, T - 1)}
        then k's ~ U{j_rev + 1..T} (`capped_leap_pair`)."""
        if self.max_j_reverse <= 0:
            return 2 / (steps * (steps - 1))
        j_choices = min(self.max_j_reverse, steps - 1)
        return 1 / (j_choices * j) if steps - j <= j_choices else 0.0


def rollout_calls(path, active: int) -> Calls:
    """A FlowBP path's denoiser calls: the whole rollout without gradient, then each of `active` steps' velocities
    again with it."""
    return Calls(0, path.steps) + path.guided_calls(active, path.uncond_gradient)


def check_pair_knobs(config, section: str) -> None:
    """The (k, j) knobs of `gradient_paths.<section>`, and a schedule long enough for a pair (FlowBP's min span 3,
    `rollout_window.py:49-97`)."""
    knobs = config.gradient_paths[section]
    if config.steps < 3:
        raise UserError(f"gradient_path={section!r} needs steps >= 3 (it draws two steps k < j), got {config.steps}")
    if knobs.jk_sampling not in PAIR_MODES:
        raise UserError(
            f"gradient_paths.{section}.jk_sampling={knobs.jk_sampling!r}; choose one of: {', '.join(PAIR_MODES)}"
        )
    for key in ("dirichlet_alpha_a", "dirichlet_alpha_b", "dirichlet_alpha_c"):
        if not knobs[key] > 0:
            raise UserError(f"gradient_paths.{section}.{key}={knobs[key]} must be > 0 (a Dirichlet concentration)")
    check_auto_or_at_least(knobs, section, "max_j_reverse", 0)


# --- the rollout ---------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """The no-grad sampler from step `start` to the end: the latents and velocities of the steps asked for,
    the finished sample, the timesteps and the sigma grid (N + 1 values, float32 as the scheduler holds them)."""

    latents: dict[int, torch.Tensor]
    velocities: dict[int, torch.Tensor]
    final: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor

    def span(self, start: int, target: int) -> float:
        """sigma_target - sigma_start, taken in the scheduler's float32 as the Euler step (and FlowBP) takes it."""
        return float(self.sigmas[target] - self.sigmas[start])

    def delta(self, step: int) -> float:
        """sigma_{i+1} - sigma_i."""
        return self.span(step, step + 1)

    def sigma(self, step: int) -> float:
        return float(self.sigmas[step])


def rollout(model, conditioning, latents, options, start, generator, keep_latents=(), keep_velocities=()) -> Rollout:
    """`sample` without gradient from `latents` at step `start`, keeping x_i of `keep_latents` and v_i of
    `keep_velocities` (steps >= start)."""
    timesteps = model.set_timesteps(options.steps, latents.device)
    sigmas = model.scheduler.sigmas
    wanted = set(keep_latents) | set(keep_velocities)
    assert all(step >= start for step in wanted), f"steps {sorted(wanted)} lie before the start {start}"
    kept_latents, kept_velocities = {}, {}
    with torch.no_grad():
        for step in range(start, options.steps):
            timestep = timesteps[step]
            velocity = guided_prediction(model, latents, timestep, conditioning, options)
            if step in keep_latents:
                kept_latents[step] = latents
            if step in keep_velocities:
                kept_velocities[step] = velocity
            latents = model.step(velocity, timestep, latents, eta=options.eta, generator=generator)
    return Rollout(kept_latents, kept_velocities, latents, timesteps, sigmas)


# --- connectors ----------------------------------------------------------------------------------------------


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Value x (exactly), gradient `scale` times x's."""
    if scale == 1:
        return x
    detached = x.detach()
    return detached + scale * (x - detached)


def straight_through(estimate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Value `value` (exactly), gradient that of `estimate`."""
    return value + (estimate - estimate.detach())


def rescale_factor(weights: list[float], active: list[float], strength: float) -> float:
    """1 + strength (sum |weights| / sum |active| - 1) when strength > 0 and the active sum exceeds 1e-8, else 1."""
    active_sum = sum(abs(w) for w in active)
    if strength <= 0 or active_sum <= 1e-8:
        return 1.0
    return 1.0 + strength * (sum(abs(w) for w in weights) / active_sum - 1.0)


# --- Lagrange quadrature (flowbp_lagrange_utils.py) --------------------------------------------------------------


def interval_supports(start: int, target: int, steps: int, order: int) -> list[int]:
    """About `order` evenly spread steps of [start, target) (the target never one): all of them when there are at
    most `order`, else positions linspace(0, L - 1, order) rounded half to even (float32), the first `start`,
    duplicates dropped (`_select_interval_support_indices`, flowbp_lagrange_utils.py:51-80)."""
    order = max(1, order)
    interval = list(range(start, min(target - 1, steps - 1) + 1))
    if len(interval) <= order:
        return interval
    positions = torch.linspace(0, len(interval) - 1, steps=order).round().long().tolist()
    chosen = [interval[p] for p in positions]
    chosen[0] = start
    return list(dict.fromkeys(chosen))


def active_supports(supports: list[int], mode: str, max_active: int) -> list[int]:
    """The supports whose velocity keeps gradient: "start" the first, "midpoint" the first two, "all" every one;
    then the first `max_active` (0: no limit) (`_select_active_support_indices`, flowbp_lagrange_utils.py:121-164)."""
    chosen = {"start": supports[:1], "midpoint": supports[:2], "all": list(supports)}[mode]
    return chosen[:max_active] if max_active > 0 else chosen


def lagrange_weights(nodes, start, target) -> torch.Tensor:
    """w_m = integral from `start` to `target` of the m-th Lagrange basis polynomial on `nodes`, in float64
    (`_lagrange_integral_weights`, flowbp_lagrange_utils.py:185-222; it then casts them to float32): the quadrature
    that is exact for polynomials of degree < len(nodes); one node gives target - start (the Euler step)."""
    points = torch.as_tensor(nodes, dtype=torch.float64).flatten()
    low = torch.as_tensor(start, dtype=torch.float64)
    high = torch.as_tensor(target, dtype=torch.float64)
    weights = []
    for m in range(points.numel()):
        coefficients = torch.ones(1, dtype=torch.float64)  # prod_{n != m} (s - p_n), lowest power first
        denominator = torch.ones((), dtype=torch.float64)
        for n in range(points.numel()):
            if n == m:
                continue
            shifted = torch.zeros(coefficients.numel() + 1, dtype=torch.float64)
            shifted[:-1] -= points[n] * coefficients
            shifted[1:] += coefficients
            coefficients = shifted
            denominator = denominator * (points[m] - points[n])
        powers = torch.arange(1, coefficients.numel() + 1, dtype=torch.float64)
        weights.append((coefficients / denominator / powers * (high**powers - low**powers)).sum())
    return torch.stack(weights)


def uniform_weights(count: int, start, target) -> torch.Tensor:
    """(target - start) / count for each of `count` supports, float64 (`_uniform_integral_weights`)."""
    return torch.full((count,), (float(target) - float(start)) / count, dtype=torch.float64)
