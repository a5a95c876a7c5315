"""The FlowBP estimators (alignprop.paths.flowbp_sparse, flowbp_bridge, flowbp_lagrange) against a plain transcription
of their definitions, in float64.

The naive versions below are FlowBP's estimators (RuoyuWang-2077/FlowBP @ 93b220a,
flowbp/trainers/{sd35,flux1}/flowbp_*.py) written out without the reference's bf16 casts: a plain loop over the sigma
grid caching x_i and v_i without gradient, guidance from two separate denoiser calls with the unconditional one detached
(SD3; FLUX: one call), the whole Euler composition from the noise with the reference's own straight-through and
gradient-scale sums, supports and active supports transcribed from those trainers, and the Lagrange weights from a
Vandermonde solve (not the polynomial expansion our module uses).
"""

import json

import pytest
import torch
from gradient_checks import PROMPTS, float64_model_with_lora, relative_errors, weighted_lora_grads
from small_runs import assert_one_line_before_the_run_directory, one_update_runner, small_config

from alignprop import paths, schema
from alignprop.errors import UserError
from alignprop.lora_files import LORA_FILE_NAME as LORA_FILE
from alignprop.paths import flowbp_common
from alignprop.paths.flowbp_bridge import FlowBPBridge, split_active
from alignprop.paths.flowbp_common import interval_supports, lagrange_weights
from alignprop.paths.flowbp_lagrange import FlowBPLagrange
from alignprop.paths.flowbp_sparse import FlowBPSparse
from alignprop.paths.step_draws import (
    capped_leap_pair,
    dirichlet_pair,
    dirichlet_pair_from_seed,
    late_biased_steps,
    leap_pair,
)
from alignprop.presets import load_preset
from alignprop.randomness import RandomStreams
from alignprop.sampling import SamplingOptions, initial_latents, sample

STEPS = 7
GUIDANCE = 5.0
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CLASSES = {"flowbp_sparse": FlowBPSparse, "flowbp_bridge": FlowBPBridge, "flowbp_lagrange": FlowBPLagrange}
LAST = STEPS - 1

# The knobs of each case (set explicitly: the naive loop takes the same numbers) and its plan.
SPARSE = {"grad_rescale": 0.5, "uncond_gradient": False}
BRIDGE = {"alpha": 0.5, "grad_rescale": 1.0, "uncond_gradient": False}
LAGRANGE = {  # FlowBP's FLUX.1 config, tau below the tiny models' distances so that the weights vary
    "alpha": 0.1,
    "tau": 1e-3,
    "connector_order": 3,
    "weight_scheme": "lagrange",
    "grad_support_mode": "midpoint",
    "grad_support_scale": 0.25,
    "max_active_supports": 2,
    "grad_rescale": 0.5,
    "anchor_lambda": 1.0,
    "uncond_gradient": False,
}
CASES = {
    "sparse": ("flowbp_sparse", SPARSE, {"active": (1, 4)}),
    "sparse_ends": ("flowbp_sparse", {**SPARSE, "grad_rescale": 1.0}, {"active": (0, 3, LAST)}),
    "bridge": ("flowbp_bridge", BRIDGE, {"k": 1, "j": 3, "before": (0, 2), "after": (3, 5)}),
    # j the last step: nothing after it but j itself; no rescale
    "bridge_last": (
        "flowbp_bridge",
        {**BRIDGE, "alpha": 0.1, "grad_rescale": 0.0},
        {"k": 2, "j": LAST, "before": (1, 4), "after": (LAST,)},
    ),
    "lagrange": ("flowbp_lagrange", LAGRANGE, {"k": 1, "j": 5}),
    "lagrange_last": ("flowbp_lagrange", LAGRANGE, {"k": 0, "j": LAST}),
    "lagrange_adjacent": ("flowbp_lagrange", LAGRANGE, {"k": LAST - 1, "j": LAST}),  # one support each
    # the Euler-anchored blend, equal weights, every support active
    "lagrange_variant": (
        "flowbp_lagrange",
        {
            **LAGRANGE,
            "anchor_lambda": 0.4,
            "weight_scheme": "uniform",
            "grad_support_mode": "all",
            "max_active_supports": 0,
        },
        {"k": 1, "j": 4},
    ),
}


@pytest.fixture(scope="module", params=["tiny_sd3", "tiny_flux"])
def flow64(request):
    return float64_model_with_lora(request.param, TARGETS)


def estimator(name, family="", steps=STEPS, **knobs):
    config = load_preset("tiny")
    config.steps, config.gradient_path = steps, name
    config.gradient_paths[name].update(knobs)
    return CLASSES[name](config, family)


def plan_of(path, plan):
    if isinstance(path, FlowBPSparse):
        return path.plan(plan["active"])
    if isinstance(path, FlowBPBridge):
        return path.plan(plan["k"], plan["j"], plan["before"], plan["after"])
    return path.plan(plan["k"], plan["j"])


def inputs(model):
    return model.encode(PROMPTS), initial_latents(2, model, torch.Generator().manual_seed(0)).double()


def ours(model, case, options=None, **more):
    name, knobs, plan = CASES[case]
    path = estimator(name, model.name, **{**knobs, **more})
    conditioning, latents = inputs(model)
    (branch,) = path.sample(
        model, conditioning, latents, plan_of(path, plan), options or SamplingOptions(STEPS, GUIDANCE)
    )
    return branch


# --- the naive transcription (spec §7, float64) ---------------------------------------------------------------


def ST(p, t):  # noqa: N802
    return p + (t - p).detach()


def GS(t, c):  # noqa: N802
    return t.detach() + c * (t - t.detach())


class Naive:
    """One micro-batch's rollout cache and the guided velocity v(x, i) at grid index i."""

    def __init__(self, model, conditioning, x1, uncond_grad=False):
        options = SamplingOptions(STEPS, GUIDANCE)
        guided = model.guided(options)  # FLUX: records the embedded guidance
        timesteps = model.set_timesteps(STEPS, "cpu")
        self.sig = [float(s) for s in model.scheduler.sigmas]

        def v(x, i):
            t = timesteps[i]
            if not guided:
                return model.predict(x, t, conditioning.kwargs("cond"))
            uncond = model.predict(x, t, conditioning.kwargs("uncond"))
            cond = model.predict(x, t, conditioning.kwargs("cond"))
            uncond = uncond if uncond_grad else uncond.detach()
            return uncond + GUIDANCE * (cond - uncond)

        self.v = v
        self.xs, self.vs, x = [], [], x1
        with torch.no_grad():
            for i in range(STEPS):
                self.xs.append(x)
                vi = v(x, i).detach()
                self.vs.append(vi)
                x = x + (self.sig[i + 1] - self.sig[i]) * vi
        self.x0 = x

    def compose(self, x_start, a, b, av, gam):
        x = x_start
        for i in range(a, b):
            u = GS(av[i], gam) if i in av else self.vs[i]
            x = x + (self.sig[i + 1] - self.sig[i]) * u
        return x

    def rescale(self, active, gr):
        d = [abs(self.sig[i + 1] - self.sig[i]) for i in range(STEPS)]
        act = sum(d[i] for i in active)
        return 1.0 + gr * (sum(d) / act - 1.0) if gr > 0 and act > 1e-8 else 1.0


def naive_sparse(n, knobs, active):
    gam = n.rescale(active, knobs["grad_rescale"])
    av = {i: n.v(n.xs[i].detach(), i) for i in active}
    return ST(n.compose(n.xs[0], 0, STEPS, av, gam), n.x0), torch.ones(2, dtype=torch.float64)


def naive_bridge(n, knobs, k, j, before, after):
    gam = n.rescale(list(before) + list(after), knobs["grad_rescale"])
    alpha = knobs["alpha"]
    av = {i: n.v(n.xs[i].detach(), i) for i in before}
    xjc = ST(n.compose(n.xs[0], 0, j, av, gam), n.xs[j])
    xin = alpha * xjc + (1.0 - alpha) * xjc.detach()
    av = {i: n.v(xin if i == j else n.xs[i].detach(), i) for i in sorted(after)}
    return ST(n.compose(xjc, j, STEPS, av, gam), n.x0), torch.ones(2, dtype=torch.float64)


def naive_supports(a, b, p):
    """§4.1."""
    interval = list(range(a, min(b - 1, STEPS - 1) + 1))
    if len(interval) <= p:
        return interval
    chosen = [interval[q] for q in torch.linspace(0, len(interval) - 1, steps=p).round().long().tolist()]
    chosen[0] = a
    return list(dict.fromkeys(chosen))


def naive_active(supports, a, mode, max_active):
    """§4.3."""
    chosen = {"start": [a], "midpoint": supports[:2] if len(supports) > 1 else [a], "all": list(supports)}[mode]
    return chosen[:max_active] if max_active > 0 else chosen


def vandermonde_weights(nodes, a, b):
    """The interpolatory quadrature on `nodes` over [a, b]: sum_m w_m p_m^q = integral of s^q for q < len(nodes)."""
    p = torch.tensor(nodes, dtype=torch.float64)
    q = torch.arange(len(nodes), dtype=torch.float64)
    moments = (b ** (q + 1) - a ** (q + 1)) / (q + 1)
    return torch.linalg.solve((p[:, None] ** q[None, :]).T, moments)


def naive_lagrange(n, knobs, k, j):
    sig = n.sig

    def Q(x_start, a, b, v_a):  # noqa: N802
        S = naive_supports(a, b, knobs["connector_order"])
        if knobs["weight_scheme"] == "uniform":
            W = torch.full((len(S),), (sig[b] - sig[a]) / len(S), dtype=torch.float64)
        else:
            W = vandermonde_weights([sig[i] for i in S], sig[a], sig[b])
        act = naive_active(S, a, knobs["grad_support_mode"], knobs["max_active_supports"])
        av = {i: (v_a if i == a else GS(n.v(n.xs[i].detach(), i), knobs["grad_support_scale"])) for i in act}
        fac = 1.0
        if knobs["grad_rescale"] > 0 and act:
            aa = sum(W[S.index(i)].abs() for i in act)
            if aa > 1e-8:
                fac = 1.0 + knobs["grad_rescale"] * ((W.abs().sum() / aa).item() - 1.0)
        d = torch.zeros_like(x_start)
        for w, i in zip(W, S):
            u = (GS(av[i], fac) if fac != 1.0 else av[i]) if i in av else n.vs[i].detach()
            d = d + w * u
        return x_start + d

    v_k = n.v(n.xs[k], k)
    xjL = Q(n.xs[k], k, j, v_k)
    xjE = n.xs[k] + (sig[j] - sig[k]) * v_k
    lam = knobs["anchor_lambda"]
    xjp = xjL if lam == 1.0 else (xjE if lam == 0.0 else xjE + lam * (xjL - xjE))
    xjc = ST(xjp, n.xs[j])
    xin = knobs["alpha"] * xjc + (1.0 - knobs["alpha"]) * xjc.detach()
    x0p = Q(xjc, j, STEPS, n.v(xin, j))
    dims = tuple(range(1, n.x0.ndim))
    dj = (n.xs[j] - xjp.detach()).abs().mean(dims)
    d0 = (n.x0 - x0p.detach()).abs().mean(dims)
    w_sim = 1.0 / (dj.clip(min=knobs["tau"]) + d0.clip(min=knobs["tau"]))
    return ST(x0p, n.x0), w_sim.detach()


def naive(model, case, uncond_grad=False, **more):
    name, knobs, plan = CASES[case]
    knobs = {**knobs, **more}
    conditioning, latents = inputs(model)
    n = Naive(model, conditioning, latents, uncond_grad)
    if name == "flowbp_sparse":
        return naive_sparse(n, knobs, plan["active"])
    if name == "flowbp_bridge":
        return naive_bridge(n, knobs, plan["k"], plan["j"], plan["before"], plan["after"])
    return naive_lagrange(n, knobs, plan["k"], plan["j"])


def grads_of(model, latents, weight):
    """LoRA gradients of sum_b w_b mean((decode(x_b) - 0.3)^2)."""
    return weighted_lora_grads(model, [(latents, weight)])


# --- gradients, values, weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_lora_gradients_equal_the_naive_definition(flow64, case):
    branch = ours(flow64, case)
    expected = grads_of(flow64, *naive(flow64, case))
    assert max(g.abs().max() for g in expected.values()) > 0, "no gradient: the comparison would prove nothing"
    errors = relative_errors(grads_of(flow64, branch.latents, branch.weight), expected)
    assert max(errors.values()) <= 1e-5, f"{case}: worst relative error {max(errors.values()):.2e}"


@pytest.fixture(scope="module")
def sd3_64():
    return float64_model_with_lora("tiny_sd3", TARGETS)


@pytest.mark.parametrize("case", ["sparse", "bridge", "lagrange"])
def test_the_unconditional_gradient_knob_equals_the_naive_definition(sd3_64, case):
    """uncond_gradient=True: one batched [uncond; cond] call with gradient, both halves in the gradient."""
    model = sd3_64
    branch = ours(model, case, uncond_gradient=True)
    expected = grads_of(model, *naive(model, case, uncond_grad=True))
    errors = relative_errors(grads_of(model, branch.latents, branch.weight), expected)
    assert max(errors.values()) <= 1e-5, f"{case}: worst relative error {max(errors.values()):.2e}"
    without = grads_of(model, *naive(model, case))
    assert max(relative_errors(without, expected).values()) > 1e-3  # the knob changes the gradient


@pytest.mark.parametrize("case", ["sparse", "bridge_last", "lagrange", "lagrange_variant"])
def test_the_scored_latents_are_the_plain_sample_exactly(flow64, case):
    """The straight-through sums keep their values exactly (x_N + (x0_hat - sg(x0_hat))): the scored latents are
    bit-for-bit the no-grad sample, with gradient; the Lagrange weight is the naive loop's."""
    conditioning, latents = inputs(flow64)
    branch = ours(flow64, case)
    with torch.no_grad():
        plain = sample(flow64, conditioning, latents, (False,) * STEPS, SamplingOptions(STEPS, GUIDANCE))
    assert branch.latents.requires_grad and torch.equal(branch.latents.detach(), plain)
    naive_latents, naive_weight = naive(flow64, case)
    # the naive chain is the same up to its own rounding: separate guidance calls, and sigma differences taken in
    # float64 where the scheduler's Euler step takes them in float32 (~1e-8 relative)
    torch.testing.assert_close(naive_latents.detach(), plain, rtol=1e-6, atol=1e-6)
    if case.startswith("lagrange"):
        assert branch.weight.shape == (2,) and branch.weight.dtype == torch.float64 and not branch.weight.requires_grad
        assert (branch.weight < 1 / (2 * LAGRANGE["tau"])).all()  # the distances themselves count, not the floor
        torch.testing.assert_close(branch.weight, naive_weight, rtol=1e-6, atol=0)
    else:
        assert branch.weight == 1.0


# --- Lagrange weights and supports ----------------------------------------------------------------------------


def sd35_grid(steps=25):
    """FlowBP's SD3.5 training grid: shift 3 on linspace(1, 1/N, N) in float32, then a terminal 0 (spec §1.1)."""
    s = torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64).float()
    return [float(x) for x in (3 * s / (1 + 2 * s))] + [0.0]


def test_lagrange_weights_of_order_one_are_the_euler_jump():
    sig = sd35_grid()
    for a, b in [(0, 1), (3, 9), (5, 25)]:
        weights = lagrange_weights([sig[a]], sig[a], sig[b])
        assert weights.dtype == torch.float64 and weights.tolist() == [sig[b] - sig[a]]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_lagrange_weights_integrate_polynomials_below_their_order_exactly(count):
    """On the SD3.5 grid from step 3 to the end (sigma 0): the supports of `count` nodes, as the estimator uses them."""
    sig = sd35_grid()
    nodes, a, b = [sig[i] for i in interval_supports(3, 25, 25, count)], sig[3], sig[25]
    weights = lagrange_weights(nodes, a, b)
    assert weights.dtype == torch.float64
    for degree in range(count):
        quadrature = sum(w * x**degree for w, x in zip(weights.tolist(), nodes))
        exact = (b ** (degree + 1) - a ** (degree + 1)) / (degree + 1)
        assert abs(quadrature - exact) <= 1e-12 * max(1.0, abs(exact)), f"degree {degree}"
    degree = count  # one degree more: not exact
    quadrature = sum(w * x**degree for w, x in zip(weights.tolist(), nodes))
    assert abs(quadrature - (b ** (degree + 1) - a ** (degree + 1)) / (degree + 1)) > 1e-6
    torch.testing.assert_close(weights, vandermonde_weights(nodes, a, b), rtol=1e-10, atol=1e-13)


def test_lagrange_weights_and_supports_are_the_specs_on_the_sd35_grid():
    """Spec §8 (read off the reference at 25 steps, connector order 3) and §4.1's support table."""
    sig = sd35_grid()
    expected = {
        (5, 14): ([5, 9, 13], [-0.0256338, -0.1153028, -0.0800127]),
        (14, 25): ([14, 19, 24], [-0.0473066, -0.3743412, -0.2804798]),
        (10, 20): ([10, 14, 19], [-0.0189210, -0.2182228, -0.1524665]),
        (20, 25): ([20, 22, 24], [-0.0728571, -0.1176735, -0.2380408]),
        (4, 25): ([4, 14, 24], [0.04575, -0.63541, -0.35064]),
    }
    for (a, b), (supports, weights) in expected.items():
        assert interval_supports(a, b, 25, 3) == supports
        got = lagrange_weights([sig[i] for i in supports], sig[a], sig[b])
        torch.testing.assert_close(got, torch.tensor(weights, dtype=torch.float64), rtol=0, atol=1e-5)
        assert abs(float(got.sum()) - (sig[b] - sig[a])) <= 1e-12
    table = {1: [0], 2: [0, 1], 3: [0, 1, 2], 4: [0, 2, 3], 5: [0, 2, 4], 6: [0, 2, 5], 7: [0, 3, 6]}
    table |= {8: [0, 4, 7], 9: [0, 4, 8], 10: [0, 4, 9], 11: [0, 5, 10], 12: [0, 6, 11]}
    for length, supports in table.items():
        assert interval_supports(0, length, 25, 3) == supports


# --- which denoiser calls carry gradient -------------------------------------------------------------------


def calls(model, case):
    """(step, half, input requires grad) of every denoiser call whose output requires grad; half: "both" for a
    batched [uncond; cond] call, else "uncond" / "cond"."""
    conditioning, _ = inputs(model)
    uncond = conditioning.uncond["encoder_hidden_states"] if conditioning.uncond else None
    scale = 1000 if model.name == "flux" else 1  # FLUX's transformer gets timestep / 1000
    timesteps = [float(t) / scale for t in model.set_timesteps(STEPS, "cpu")]
    seen = []

    def on_forward(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        t = float((args[1] if len(args) > 1 else kwargs["timestep"]).flatten()[0])
        out = output[0] if isinstance(output, tuple) else output.sample
        embeds = kwargs["encoder_hidden_states"]
        half = (
            "both" if x.shape[0] == 4 else ("uncond" if uncond is not None and torch.equal(embeds, uncond) else "cond")
        )
        if out.requires_grad:
            seen.append((min(range(STEPS), key=lambda i: abs(timesteps[i] - t)), half, x.requires_grad))

    handle = model.denoiser.register_forward_hook(on_forward, with_kwargs=True)
    try:
        ours(model, case, SamplingOptions(STEPS, GUIDANCE, grad_checkpoint=False))
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize(
    "case, expected",
    [
        ("sparse", [(1, False), (4, False)]),  # the active steps, at their cached (constant) latents
        ("bridge", [(0, False), (2, False), (3, True), (5, False)]),  # j's input carries the bridge's gradient
        # v_k, k -> j's second support (supports 1, 3, 4), v_j (its input differentiable), j -> end's second (5, 6)
        ("lagrange", [(1, False), (3, False), (5, True), (6, False)]),
        ("lagrange_adjacent", [(LAST - 1, False), (LAST, True)]),
    ],
)
def test_hooks_see_gradient_only_in_the_planned_calls(flow64, case, expected):
    seen = calls(flow64, case)
    half = "cond"  # SD3: the unconditional half runs in its own call without gradient; FLUX: one call
    assert seen == [(step, half, grad_input) for step, grad_input in expected]


# --- draws ---------------------------------------------------------------------------------------------------


def test_the_first_draws_are_the_specs_where_torch_draws_the_same():
    """Spec §8, FlowBP's generator seeded 114 (its vectors are torch 2.6's). uniform (randperm) draws the same here;
    the Dirichlet draw's only use of the generator is randint(0, 2**31), which the torch installed here takes from
    64 bits where torch 2.6 took 32 (from seed 114 it draws the spec's 2nd, 4th, ... seeds), so that case is checked
    from the spec's seeds; torch.multinomial (the late-biased draw) differs too: the spec's SD3.5 Sparse draw
    [14, 17, 18, 21] is [5, 17, 20, 24] here. Our draws come from the trainer's streams anyway, not seed 114."""
    generator = torch.Generator().manual_seed(114)
    assert [leap_pair(25, generator) for _ in range(3)] == [(3, 4), (5, 15), (6, 19)]
    seeds = [651254346, 542964499, 1583748902, 1253362258, 1829156859]
    expected = [(7, 23), (1, 22), (6, 16), (6, 20), (2, 17)]
    for cap in (0, 10):  # the SD3.5 cap does not bind on these
        assert [dirichlet_pair_from_seed(25, (2.5, 6.0, 2.0), seed, cap) for seed in seeds] == expected
    generator, copy = torch.Generator().manual_seed(114), torch.Generator().manual_seed(114)
    seed = int(torch.randint(0, 2**31, (1,), generator=copy))
    assert dirichlet_pair(25, (2.5, 6.0, 2.0), generator) == dirichlet_pair_from_seed(25, (2.5, 6.0, 2.0), seed)


def test_pair_draws_give_valid_indices_and_honour_the_cap():
    generator = torch.Generator().manual_seed(0)
    for steps in (3, 4, 7, 25):
        dirichlet = [dirichlet_pair(steps, (2.5, 6.0, 2.0), generator) for _ in range(300)]
        assert all(0 <= k < j <= steps - 2 for k, j in dirichlet)  # Dirichlet: j_rev >= 2
        capped = [dirichlet_pair(steps, (2.5, 6.0, 2.0), generator, max_j_reverse=2) for _ in range(300)]
        assert all(0 <= k < j and j == steps - 2 for k, j in capped)  # |A| capped at max(1, 2 - 1)
        uniform = [capped_leap_pair(steps, 2, generator) for _ in range(300)]
        assert all(0 <= k < j and steps - 2 <= j <= steps - 1 for k, j in uniform)
        assert {j for _, j in uniform} == {steps - 2, steps - 1} and {k for k, _ in uniform} == set(range(steps - 1))
    # a large a-concentration pushes j towards the noise end; the SD3.5 cap (10) keeps it within 10 steps of the end
    big_a = [dirichlet_pair(25, (60.0, 2.0, 2.0), generator, max_j_reverse=10) for _ in range(100)]
    assert all(j == 25 - 10 for _, j in big_a)


def test_late_biased_draws_are_distinct_sorted_and_late():
    generator = torch.Generator().manual_seed(0)
    draws = [late_biased_steps(25, 4, 2.0, generator) for _ in range(2000)]
    assert all(len(set(d)) == 4 and d == sorted(d) and 0 <= d[0] and d[-1] < 25 for d in draws)
    counts = torch.bincount(torch.tensor(draws).flatten(), minlength=25)
    assert counts[-1] > 5 * counts[0] and counts[:5].sum() < counts[-5:].sum()
    assert late_biased_steps(3, 5, 2.0, generator) == [0, 1, 2]  # K >= the steps: all, without a draw
    state = generator.get_state()
    assert late_biased_steps(4, 4, 1.0, generator) == [0, 1, 2, 3] and torch.equal(generator.get_state(), state)


def test_the_bridge_budget_split_is_the_references():
    """_allocate_flowbp_bridge_active_counts (sd35/flowbp_bridge.py:60-98): proportional, Python's round."""
    assert split_active(5, 3, 4) == (2, 3)
    assert split_active(5, 3, 3) == (2, 3)  # 2.5 rounds to even
    assert split_active(5, 1, 24) == (1, 4)
    assert split_active(5, 24, 1) == (4, 1)
    assert split_active(5, 2, 2) == (2, 2)  # the budget capped at the steps
    assert split_active(3, 1, 3) == (1, 2)


@pytest.mark.parametrize("name", list(CLASSES))
def test_draws_use_only_the_plans_stream_and_give_valid_plans(name):
    path, random = estimator(name, "sd3"), RandomStreams.seeded(0, 0)
    before = random.state_dict()
    plans = [path.draw(random, None, None) for _ in range(300)]
    after = random.state_dict()
    assert after["prompts"] == before["prompts"] and torch.equal(after["latents"], before["latents"])
    assert not torch.equal(after["plans"], before["plans"])
    for plan in plans:
        json.dumps(plan.record())
        trained = plan.trained_steps()
        assert path.gradient_free_steps(plan) == trained[0]
        if name == "flowbp_sparse":
            assert trained == list(plan.active) and len(trained) == 4  # SD3.5's K
        elif name == "flowbp_bridge":
            assert 0 <= plan.k < plan.j < STEPS and plan.after[0] == plan.j and max(plan.before) < plan.j
            assert len(plan.before) + len(plan.after) == 5 and trained == sorted(plan.before + plan.after)
        else:
            assert 0 <= plan.k < plan.j <= STEPS - 2 and trained[0] == plan.k and plan.j in trained
            assert plan.active_kj[0] == plan.k and plan.active_j0[0] == plan.j and len(plan.active_kj) <= 2


def test_family_values_follow_flowbps_configs():
    sd3, flux, other = (estimator("flowbp_sparse", family) for family in ("sd3", "flux", ""))
    assert (sd3.num_active_steps, sd3.late_bias, sd3.grad_rescale) == (4, 1.0, 0.5)
    assert (flux.num_active_steps, flux.late_bias, flux.grad_rescale) == (3, 2.0, 1.0)
    assert (other.num_active_steps, other.late_bias, other.grad_rescale) == (3, 2.0, 1.0)
    assert estimator("flowbp_sparse", "sd3", num_active_steps=2, late_bias=0.0).num_active_steps == 2
    sd3, flux = estimator("flowbp_bridge", "sd3"), estimator("flowbp_bridge", "flux")
    assert (sd3.late_bias, sd3.grad_rescale, sd3.alpha, sd3.num_active_steps) == (4.0, 0.0, 0.5, 5)
    assert (flux.late_bias, flux.grad_rescale, flux.alpha, flux.num_active_steps) == (2.0, 1.0, 0.1, 5)
    assert sd3.pairs.mode == flux.pairs.mode == "uniform" and sd3.pairs.max_j_reverse == 0
    sd3, flux = estimator("flowbp_lagrange", "sd3"), estimator("flowbp_lagrange", "flux")
    assert (sd3.grad_rescale, sd3.pairs.max_j_reverse, flux.grad_rescale, flux.pairs.max_j_reverse) == (0.0, 10, 0.5, 0)
    assert sd3.pairs.mode == "dirichlet" and sd3.pairs.concentration == (2.5, 6.0, 2.0)
    assert (sd3.alpha, sd3.tau, sd3.order, sd3.support_mode, sd3.support_scale, sd3.max_active) == (
        0.1,
        0.2,
        3,
        "midpoint",
        0.25,
        2,
    )


def test_the_schemas_choices_are_the_modules():
    rule = lambda key: schema.RULES[f"gradient_paths.{key}"].choices()  # noqa: E731
    assert rule("flowbp_bridge.jk_sampling") == rule("flowbp_lagrange.jk_sampling") == flowbp_common.PAIR_MODES
    assert rule("flowbp_lagrange.weight_scheme") == flowbp_common.WEIGHT_SCHEMES
    assert rule("flowbp_lagrange.grad_support_mode") == flowbp_common.SUPPORT_MODES


# --- settings ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"gradient_path": "flowbp_sparse", "gradient_paths.flowbp_sparse.late_bias": -0.5}, "flowbp_sparse.late_bias"),
        ({"gradient_path": "flowbp_sparse", "gradient_paths.flowbp_sparse.num_active_steps": 0}, "num_active_steps"),
        ({"gradient_path": "flowbp_bridge", "gradient_paths.flowbp_bridge.num_active_steps": 1}, "num_active_steps"),
        ({"gradient_path": "flowbp_bridge", "gradient_paths.flowbp_bridge.alpha": 1.5}, "flowbp_bridge.alpha"),
        ({"gradient_path": "flowbp_bridge", "gradient_paths.flowbp_bridge.jk_sampling": "midpoint"}, "jk_sampling"),
        ({"gradient_path": "flowbp_lagrange", "gradient_paths.flowbp_lagrange.tau": 0.0}, "flowbp_lagrange.tau"),
        ({"gradient_path": "flowbp_lagrange", "gradient_paths.flowbp_lagrange.grad_support_mode": "none"}, "support"),
        ({"gradient_path": "flowbp_lagrange", "gradient_paths.flowbp_lagrange.max_j_reverse": -2}, "max_j_reverse"),
        ({"gradient_path": "flowbp_lagrange", "gradient_paths.flowbp_lagrange.grad_rescale": -0.1}, "grad_rescale"),
        (
            {
                "gradient_path": "flowbp_bridge",
                "steps": 2,
                "truncated_backprop_minmax": (0, 2),
                "trunc_backprop_timestep": 0,
            },
            "steps >= 3",
        ),
    ],
)
def test_bad_settings_are_one_line_before_the_run_directory(preset, tmp_path, overrides, words):
    assert_one_line_before_the_run_directory(small_config(preset, tmp_path, **overrides), tmp_path, words)


@pytest.mark.parametrize("name", list(CLASSES))
def test_a_ddim_model_is_one_line_before_the_run_directory(preset, tmp_path, name):
    from alignprop.jobs import run_job

    with pytest.raises(UserError) as error:
        run_job(small_config(preset, tmp_path, gradient_path=name))
    message = str(error.value)
    assert "flow-matching velocity over sigma" in message and "SD3/FLUX" in message and "\n" not in message
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


# --- end to end ----------------------------------------------------------------------------------------------


def flow_config(preset, tmp_path, model, **overrides):
    """The tiny preset on a tiny flow model: 4 steps, 1 update of 2 samples per epoch."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na green bird\n")
    config = small_config(preset, tmp_path, **overrides)
    config.pretrained.model = model
    config.reward_fn = "compressibility"
    config.prompt_fn = config.eval_prompt_fn = f"from_file:{prompts}"
    config.sd_guidance_scale = GUIDANCE
    config.lora.target_modules = TARGETS
    config.train.total_samples_per_epoch = 2
    config.vis_freq, config.max_vis_images = 0, 1
    return config


@pytest.mark.parametrize(
    "name, model", [("flowbp_sparse", "tiny_flux"), ("flowbp_bridge", "tiny_sd3"), ("flowbp_lagrange", "tiny_sd3")]
)
def test_trains_through_run_job_and_resumes_bit_for_bit(preset, tmp_path, name, model):
    """Every draw comes from the trainer's saved streams: 1 epoch + resume == 2 epochs straight."""
    from safetensors.torch import load_file

    from alignprop.jobs import run_job

    def config(run_name, epochs, **overrides):
        return flow_config(
            preset, tmp_path, model, gradient_path=name, run_name=run_name, num_epochs=epochs, save_freq=1, **overrides
        )

    assert paths.REGISTRY[name] is CLASSES[name]
    _, straight, _ = run_job(config("straight", 2))
    _, first, _ = run_job(config("first", 1))
    _, second, _ = run_job(config("second", 2, resume_from=str(first)))
    assert list((straight / "checkpoints").glob("checkpoint_*")), "no checkpoint written"
    expected, got = load_file(straight / "lora" / LORA_FILE), load_file(second / "lora" / LORA_FILE)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if "grad_norm" in r]
    assert len(updates) == 2 and all(r["grad_norm"] > 0 and r["scored"] == "final" for r in updates)
    keys = {
        "flowbp_sparse": {"active_steps"},
        "flowbp_bridge": {"k", "j", "active_before_j", "active_from_j"},
        "flowbp_lagrange": {"k", "j", "supports_kj", "active_kj", "supports_j0", "active_j0"},
    }[name]
    assert all(set(plan) == keys for record in updates for plan in record["plans"])


# --- the no-grad prefix ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_trainer64(preset, tmp_path_factory):
    """A float64 trainer on tiny SD3 (3 micro-batches of 2 per update); `gradients(name, chunk)` runs one update
    from the same weights and streams with `name`'s estimator and returns (LoRA gradients, plans, streams after)."""
    tmp_path = tmp_path_factory.mktemp("flowbp_prefix")
    config = flow_config(preset, tmp_path, "tiny_sd3", steps=6, truncated_backprop_minmax=(0, 6))
    config.train.total_samples_per_epoch = config.train.total_batch_size = 6
    config.train.batch_size_per_gpu_available = 2
    trainer, run = one_update_runner(config)

    def gradients(name, chunk):
        path_config = trainer.config.copy_and_resolve_references()
        path_config.gradient_path = name
        grads, record, streams = run(CLASSES[name](path_config, "sd3"), chunk)
        return grads, record["plans"], streams

    return gradients


@pytest.mark.parametrize("name", list(CLASSES))
def test_the_no_grad_prefix_gives_the_same_gradients(flow_trainer64, name):
    off_grads, off_plans, off_streams = flow_trainer64(name, 0)
    on_grads, on_plans, on_streams = flow_trainer64(name, 4)
    assert on_plans == off_plans and len(on_plans) == 3
    first = [min(r.get("active_steps") or r.get("active_before_j") or [r.get("k")]) for r in off_plans]
    assert max(first) > 0  # some micro-batch has a prefix to run
    assert torch.equal(on_streams["plans"], off_streams["plans"]) and torch.equal(
        on_streams["latents"], off_streams["latents"]
    )
    assert any(g.abs().sum() > 0 for g in off_grads)
    for on, off in zip(on_grads, off_grads):
        assert (on - off).norm() <= 1e-5 * off.norm() + 1e-12
