"""Gradient paths (alignprop.paths) against plain transcriptions of their definitions, in float64.

The naive versions below use autograd everywhere, two denoiser calls per step for guidance, the DDIM update and
the forward process written out from alpha_bar, and `.detach()` exactly where each definition stops the gradient.
"""

import json

import pytest
import torch
from gradient_checks import PROMPTS, float64_model_with_lora, lora_params, relative_errors
from small_runs import assert_one_line_before_the_run_directory, small_config

from alignprop import paths
from alignprop.lora_files import LORA_FILE_NAME as LORA_FILE
from alignprop.paths.base import negated
from alignprop.paths.direct_align import linear_discount
from alignprop.presets import load_preset
from alignprop.randomness import RandomStreams
from alignprop.rewards import RewardResult
from alignprop.rewards.shaping import shaped_loss
from alignprop.sampling import SamplingOptions, decode, initial_latents

STEPS = 6
GUIDANCE = 5.0
DRTUNE_STOP = 4  # DRTune's early stop in the equivalence tests: step 4 of 6 (itself trained)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module", params=["tiny", "tiny_sdxl"])
def model64(request):
    return float64_model_with_lora(request.param, TARGETS)


# --- the naive transcriptions ------------------------------------------------------------------------------


def naive_eps(model, conditioning, x, t, uncond_grad=True):
    """Classifier-free guidance from two separate denoiser calls (epsilon prediction); `uncond_grad=False`: the
    unconditional call's output detached (FlowBP's cfg_detach_neg)."""
    uncond = model.predict(x, t, conditioning.kwargs("uncond"))
    cond = model.predict(x, t, conditioning.kwargs("cond"))
    uncond = uncond if uncond_grad else uncond.detach()
    return uncond + GUIDANCE * (cond - uncond)


def alpha_bars(model):
    """alpha_bar of every step of the STEPS-step schedule and of the level after it (DDIM, leading spacing)."""
    scheduler = model.scheduler
    timesteps = model.set_timesteps(STEPS, "cpu")
    levels = [float(scheduler.alphas_cumprod[int(t)]) for t in timesteps] + [float(scheduler.final_alpha_cumprod)]
    return timesteps, levels


def ddim(eps, a, a_next, x):
    x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
    return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps


def naive_chain(model, conditioning, x, keep=(), detach_input_at=()):
    """The DDIM chain with autograd on; the prediction detached where a step keeps no gradient."""
    timesteps, a = alpha_bars(model)
    for i, t in enumerate(timesteps):
        eps = naive_eps(model, conditioning, x.detach() if i in detach_input_at else x, t)
        if i not in keep:
            eps = eps.detach()
        x = ddim(eps, a[i], a[i + 1], x)
    return x


def naive_refl(model, conditioning, x, step):
    timesteps, a = alpha_bars(model)
    for i in range(step):
        x = ddim(naive_eps(model, conditioning, x, timesteps[i]).detach(), a[i], a[i + 1], x)
    x = x.detach()  # ReFL samples up to the trained step without gradient
    eps = naive_eps(model, conditioning, x, timesteps[step], uncond_grad=False)
    return [((x - (1 - a[step]) ** 0.5 * eps) / a[step] ** 0.5, 1.0)]


def naive_draft_lv(model, conditioning, x, noises):
    """FlowBP's DRaFT-LV: the K=1 image and n re-noised ones, their losses averaged."""
    timesteps, a = alpha_bars(model)
    weight = 1 / (1 + len(noises))
    for i in range(STEPS - 1):
        x = ddim(naive_eps(model, conditioning, x, timesteps[i]).detach(), a[i], a[i + 1], x)
    final = ddim(naive_eps(model, conditioning, x, timesteps[-1], uncond_grad=False), a[-2], a[-1], x)
    branches = [(final, weight)]
    for noise in noises:
        noisy = a[-2] ** 0.5 * final.detach() + (1 - a[-2]) ** 0.5 * noise
        eps = naive_eps(model, conditioning, noisy, timesteps[-1], uncond_grad=False)
        branches.append((ddim(eps, a[-2], a[-1], noisy), weight))
    return branches


def naive_drtune(model, conditioning, x, trained, stop):
    """FlowBP's DRTune: every denoiser input detached, the chain not; stop at `stop` and score its one-step x0."""
    timesteps, a = alpha_bars(model)
    for i in range(stop + 1):
        eps = naive_eps(model, conditioning, x.detach(), timesteps[i], uncond_grad=False)
        eps = eps if i in trained else eps.detach()
        if i == stop:
            return [((x - (1 - a[i]) ** 0.5 * eps) / a[i] ** 0.5, 1.0)]
        x = ddim(eps, a[i], a[i + 1], x)


def naive_direct_align(model, conditioning, x, step, noise, weight):
    timesteps, a = alpha_bars(model)
    clean = naive_chain(model, conditioning, x).detach()
    noisy = a[step] ** 0.5 * clean + (1 - a[step]) ** 0.5 * noise
    stepped = ddim(naive_eps(model, conditioning, noisy, timesteps[step]), a[step], a[step + 1], noisy)
    return [((stepped - (1 - a[step + 1]) ** 0.5 * noise) / a[step + 1] ** 0.5, weight)]


def naive_direct_align_inversion(model, conditioning, x, step, noise, weight):
    """SRPO's inversion branch on DDIM: noise injected at `step`'s level, the prediction there taken one DDIM step
    *up* to the level of step - 1, the clean latents recovered there from the known noise."""
    timesteps, a = alpha_bars(model)
    clean = naive_chain(model, conditioning, x).detach()
    noisy = a[step] ** 0.5 * clean + (1 - a[step]) ** 0.5 * noise
    up = ddim(naive_eps(model, conditioning, noisy, timesteps[step]), a[step], a[step - 1], noisy)
    return [((up - (1 - a[step - 1]) ** 0.5 * noise) / a[step - 1] ** 0.5, weight)]


# --- running both --------------------------------------------------------------------------------------------


def path_of(name, **knobs):
    """The gradient path `name` for a STEPS-step schedule, with `gradient_paths.<knob>` settings."""
    config = load_preset("tiny")
    config.steps = STEPS
    config.gradient_path = name
    for knob, value in knobs.items():
        config.gradient_paths[name][knob] = value
    return paths.from_config(config)


def refl(model, conditioning, latents, options, step):
    path = path_of("refl")
    return path.sample(model, conditioning, latents, path.plan(step), options)


def draft_lv(model, conditioning, latents, options, noises):
    path = path_of("draft_lv", renoise=len(noises))
    return path.sample(model, conditioning, latents, path.plan(noises), options)


def drtune(model, conditioning, latents, options, trained, stop=DRTUNE_STOP):
    path = path_of("drtune")
    return path.sample(model, conditioning, latents, path.plan(stop, trained), options)


def direct_align(model, conditioning, latents, options, level, noise, weight, branch="denoise", inversion_weight=0.0):
    """Direct-Align on the sampler's levels at `level`, with the given branch discounts (the discount ranges set so
    that they come out); "both" averages its two branches."""
    path = path_of(
        "direct_align",
        levels="sampler",
        branch=branch,
        discount=(weight, weight),
        inversion_discount=(inversion_weight, inversion_weight),
    )
    return path.sample(model, conditioning, latents, path.sampler_plan(model, level, noise, latents.device), options)


# --- running both --------------------------------------------------------------------------------------------


def inputs(model):
    conditioning = model.encode(PROMPTS)
    latents = initial_latents(2, model, torch.Generator().manual_seed(0)).double()
    noises = [initial_latents(2, model, torch.Generator().manual_seed(10 + i)).double() for i in range(2)]
    return conditioning, latents, noises


def grads_of(model, branches):
    params = lora_params(model.denoiser)
    for param in params.values():
        param.grad = None
    pairs = [(b.latents, b.weight) if isinstance(b, paths.Branch) else b for b in branches]
    loss = sum(weight * (decode(model, latents) - 0.3).square().mean() for latents, weight in pairs)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}


def ours_and_naive(model, path):
    conditioning, latents, noises = inputs(model)
    options = SamplingOptions(STEPS, GUIDANCE)
    if path == "refl":
        ours = refl(model, conditioning, latents, options, 4)
        naive = naive_refl(model, conditioning, latents, 4)
    elif path == "draft_lv":
        ours = draft_lv(model, conditioning, latents, options, noises)
        naive = naive_draft_lv(model, conditioning, latents, noises)
    elif path == "drtune":
        ours = drtune(model, conditioning, latents, options, (1, 4))
        naive = naive_drtune(model, conditioning, latents, (1, 4), DRTUNE_STOP)
    else:
        timesteps = model.set_timesteps(STEPS, "cpu")
        level = model.noise_level(timesteps[2])  # exactly step 2's level
        ours = direct_align(model, conditioning, latents, options, level, noises[0], 0.3)
        naive = naive_direct_align(model, conditioning, latents, 2, noises[0], 0.3)
    return grads_of(model, ours), grads_of(model, naive), ours


@pytest.mark.parametrize("path", ["refl", "draft_lv", "drtune", "direct_align"])
def test_lora_gradients_equal_the_naive_definition(model64, path):
    ours, naive, _ = ours_and_naive(model64, path)
    assert max(g.abs().max() for g in naive.values()) > 0, "no gradient: the comparison would prove nothing"
    errors = relative_errors(ours, naive)
    assert max(errors.values()) <= 1e-5, f"{path}: worst relative error {max(errors.values()):.2e}"


@pytest.mark.parametrize("branch", ["inversion", "both"])
def test_direct_align_inversion_branch_gradients_equal_the_naive_definition(model64, branch):
    conditioning, latents, noises = inputs(model64)
    level = model64.noise_level(model64.set_timesteps(STEPS, "cpu")[2])
    ours = direct_align(
        model64, conditioning, latents, SamplingOptions(STEPS, GUIDANCE), level, noises[0], 0.3, branch, 0.7
    )
    naive = naive_direct_align_inversion(model64, conditioning, latents, 2, noises[0], 0.7)
    if branch == "both":  # averaged: each branch's discounted loss halved
        both = naive_direct_align(model64, conditioning, latents, 2, noises[0], 0.3) + naive
        naive = [(latents, weight / 2) for latents, weight in both]
    assert [branch.inverted for branch in ours] == ([False, True] if branch == "both" else [True])
    expected = grads_of(model64, naive)
    errors = relative_errors(grads_of(model64, ours), expected)
    assert max(g.abs().max() for g in expected.values()) > 0
    assert max(errors.values()) <= 1e-5, f"{branch}: worst relative error {max(errors.values()):.2e}"


def test_the_inversion_branch_is_scored_with_the_reward_negated():
    """SRPO swaps the relative reward's prompts there: threshold loss relu(t + r), gradient descent on r."""
    reward = torch.tensor([0.2, 0.9], requires_grad=True)
    result = RewardResult(loss=1 - reward, reward=reward.detach())
    loss = shaped_loss(negated(result), "threshold", 0.7)
    loss.sum().backward()
    assert torch.allclose(loss, torch.relu(0.7 + reward.detach()))
    assert torch.equal(reward.grad, torch.ones(2))  # descent on r: d(relu(0.7 + r))/dr = 1


def test_inversion_and_denoise_branches_push_the_lora_the_same_way():
    """The inversion branch steps *up* (its recovered x0 moves with +v where the denoise branch's moves with -v)
    and is scored negated, so on the (DDIM) tiny model its gradient points like the denoise branch's; without
    the negation it would point the other way."""
    model = float64_model_with_lora("tiny", TARGETS)
    conditioning, latents, noises = inputs(model)
    level, options = model.noise_level(model.set_timesteps(STEPS, "cpu")[3]), SamplingOptions(STEPS, GUIDANCE)

    def flat_grads(branch, sign):
        sample = direct_align(model, conditioning, latents, options, level, noises[0], 1.0, branch, 1.0)
        grads = grads_of(model, [(b.latents, sign) for b in sample])
        return torch.cat([g.flatten() for g in grads.values()])

    denoise, inversion = flat_grads("denoise", 1.0), flat_grads("inversion", -1.0)
    assert torch.nn.functional.cosine_similarity(denoise, inversion, dim=0) > 0.5


def test_flow_inversion_never_steps_up_to_pure_noise(flow64):
    conditioning, latents, noises = inputs(flow64)
    timesteps = flow64.set_timesteps(STEPS, "cpu")
    options = SamplingOptions(STEPS, GUIDANCE)
    path = path_of("direct_align", branch="inversion", levels="sampler")
    plan = path.sampler_plan(flow64, 1.0, noises[0], latents.device)
    sample = path.sample(flow64, conditioning, latents, plan, options)
    assert plan.index == 2 and flow64.noise_level(timesteps[0]) == 1.0
    assert torch.isfinite(sample[0].latents).all()


def test_drtune_detaches_the_input_rather_than_the_chain(model64):
    """DRTune differs from plain sparse truncation (input not detached): the gradients must differ."""
    conditioning, latents, _ = inputs(model64)
    ours = grads_of(model64, drtune(model64, conditioning, latents, SamplingOptions(STEPS, GUIDANCE), (1, 4)))
    plain = grads_of(model64, [(naive_chain(model64, conditioning, latents, keep={1, 4}), 1.0)])
    assert max(relative_errors(ours, plain).values()) > 1e-3


# --- which denoiser calls carry gradient -------------------------------------------------------------------


def calls_with_gradient(model, path):
    """(step index, input requires grad) of every denoiser call whose output requires grad."""
    timesteps = [int(t) for t in model.set_timesteps(STEPS, "cpu")]
    calls = []

    def on_forward(module, args, kwargs, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        if sample.requires_grad:
            calls.append((timesteps.index(int(args[1])), args[0].requires_grad))

    handle = model.denoiser.register_forward_hook(on_forward, with_kwargs=True)
    try:
        ours_and_naive_ours_only(model, path)
    finally:
        handle.remove()
    return calls


def ours_and_naive_ours_only(model, path):
    conditioning, latents, noises = inputs(model)
    options = SamplingOptions(STEPS, GUIDANCE, grad_checkpoint=False)
    if path == "refl":
        return refl(model, conditioning, latents, options, 4)
    if path == "draft_lv":
        return draft_lv(model, conditioning, latents, options, noises)
    if path == "drtune":
        return drtune(model, conditioning, latents, options, (1, 4))
    level = model.noise_level(model.set_timesteps(STEPS, "cpu")[2])
    return direct_align(model, conditioning, latents, options, level, noises[0], 1.0)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("refl", [(4, False)]),
        ("draft_lv", [(STEPS - 1, False)] * 3),  # K=1, then n = 2 re-noisings, all at the last step
        ("drtune", [(1, False), (4, False)]),  # only the planned steps, never through the input
        ("direct_align", [(2, False)]),
    ],
)
def test_hooks_see_gradient_only_in_the_planned_calls(model64, path, expected):
    assert calls_with_gradient(model64, path) == expected


# --- plans and settings ------------------------------------------------------------------------------------


def streams(seed=0):
    return RandomStreams.seeded(seed, 0)


def drtune_plans(steps, train_steps, early_stop, draws=2000):
    config = load_preset("tiny")
    config.steps, config.gradient_path = steps, "drtune"
    config.gradient_paths.drtune.train_steps, config.gradient_paths.drtune.early_stop = train_steps, early_stop
    path, random = paths.from_config(config), streams()
    return {(plan.stop, tuple(plan.trained_steps())) for plan in (path.draw(random, None, None) for _ in range(draws))}


def test_drtune_without_early_stop_spaces_its_steps_with_a_random_start():
    assert drtune_plans(50, 5, 0.0, 200) == {(49, tuple(s + 10 * j for j in range(5))) for s in range(10)}


def test_drtune_plans_are_flowbps_at_25_steps():
    """FlowBP's defaults (25 steps, K = 3, early stop 0.4): m in 15..24, stride (m + 1) // 3, start in
    0..m - 2 * stride; the (m, stride, last start) table read off flowbp/trainers/sd35/drtune.py:24-75."""
    table = {15: (5, 5), 16: (5, 6), 17: (6, 5), 18: (6, 6), 19: (6, 7), 20: (7, 6), 21: (7, 7), 22: (7, 8)}
    table |= {23: (8, 7), 24: (8, 8)}
    expected = {(m, (s, s + d, s + 2 * d)) for m, (d, last) in table.items() for s in range(last + 1)}
    assert drtune_plans(25, 3, 0.4) == expected


def test_refl_step_lies_in_the_configured_range():
    config = load_preset("tiny")
    config.steps, config.gradient_path, config.gradient_paths.refl.last_steps = 40, "refl", (1, 10)
    path, random = paths.from_config(config), streams()
    assert {path.draw(random, None, None).step for _ in range(500)} == set(range(30, 40))  # ImageReward's


def test_direct_align_discount_is_linear_in_the_level():
    assert linear_discount(0.75, (0.75, 0.95), (0.1, 0.25)) == pytest.approx(0.1)
    assert linear_discount(0.85, (0.75, 0.95), (0.1, 0.25)) == pytest.approx(0.175)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"gradient_path": "refl", "gradient_paths.refl.last_steps": (1, 5)}, "refl.last_steps"),  # steps = 4
        ({"gradient_path": "draft_lv", "gradient_paths.draft_lv.renoise": 0}, "draft_lv.renoise"),
        ({"gradient_path": "drtune", "gradient_paths.drtune.train_steps": 5}, "drtune.train_steps"),
        ({"gradient_path": "drtune", "gradient_paths.drtune.early_stop": 1.5}, "drtune.early_stop"),
        ({"gradient_path": "draft_lv", "gradient_paths.draft_lv.combine": "max"}, "draft_lv.combine"),
        ({"gradient_path": "direct_align", "gradient_paths.direct_align.noise": (0.5, 1.0)}, "direct_align.noise"),
        ({"gradient_path": "direct_align", "gradient_paths.direct_align.noise": (0.0, 0.5)}, "direct_align.noise"),
        ({"gradient_path": "nope"}, "gradient_path"),
        ({"eval_reward_fns": "compressibility,nope"}, "eval_reward_fns"),
    ],
)
def test_bad_settings_are_one_line_before_the_run_directory(preset, tmp_path, overrides, words):
    assert_one_line_before_the_run_directory(small_config(preset, tmp_path, **overrides), tmp_path, words)


# --- loss shapes -------------------------------------------------------------------------------------------


def test_threshold_shape_is_the_hinge_and_keeps_the_loss_gradient_below_it():
    reward = torch.tensor([0.5, 2.5], requires_grad=True)
    result = RewardResult(loss=-reward, reward=reward.detach())
    loss = shaped_loss(result, "threshold", 2.0)
    assert loss.tolist() == [1.5, 0.0]
    loss.sum().backward()
    assert reward.grad.tolist() == [-1.0, 0.0]  # d/dr relu(2 - r)
    assert shaped_loss(result, "reward") is result.loss


# --- end to end --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["refl", "draft_lv", "drtune", "direct_align"])
def test_each_path_trains_through_run_job_and_writes_a_checkpoint(preset, tmp_path, path, capsys):
    from alignprop.jobs import run_job

    config = small_config(
        preset,
        tmp_path,
        gradient_path=path,
        num_epochs=1,
        save_freq=1,
        reward_loss="threshold" if path == "refl" else "reward",
        eval_reward_fns="compressibility,colorfulness",
        **{"gradient_paths.refl.last_steps": (1, 2), "gradient_paths.drtune.train_steps": 2},
    )
    _, run_dir, _ = run_job(config)
    lines = capsys.readouterr().out.splitlines()
    startup = [index for index, line in enumerate(lines) if line.startswith("gradient path:")]
    assert len(startup) == 1 and lines[startup[0]].startswith(f"gradient path: {path} (")
    after = lines[startup[0] + 1 :]
    assert next(line for line in after if not line.startswith("    ")) == f"reference: {paths.REGISTRY[path].reference}"
    assert list((run_dir / "checkpoints").glob("checkpoint_1*")), "no checkpoint written"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if "grad_norm" in r]
    assert len(updates) == 2 and all(r["grad_norm"] > 0 for r in updates)
    evaluations = [r for r in records if r.get("eval")]
    assert evaluations and all("heldout_compressibility_mean" in r for r in evaluations)
    scored = {"refl": "x0", "draft_lv": "final", "drtune": "x0", "direct_align": "denoise"}[path]
    assert all(r["scored"] == scored and len(r["plans"]) == len(r["kept_steps"]) for r in updates)
    calls = {"refl": 1, "draft_lv": 3, "drtune": 2, "direct_align": 2}[path]  # drtune: K = 2 of >= 2 steps
    assert all(r["gradient_calls"] == calls for r in updates)
    if path in ("draft_lv", "direct_align"):  # several branches: each one's reward, by what it scored
        names = ["reward_renoised_1_mean"] if path == "draft_lv" else ["reward_inversion_mean"]
        assert all(name in r for r in updates for name in names)


# --- flow matching (SD3): the same paths on the Euler step, x_sigma = sigma * noise + (1 - sigma) * x0 --------


@pytest.fixture(scope="module", params=["tiny_sd3", "tiny_flux"])
def flow64(request):
    return float64_model_with_lora(request.param, TARGETS)


def naive_velocity(model, conditioning, x, t, uncond_grad=True):
    """SD3: classifier-free guidance from two calls; FLUX: one call, the guidance an input of the transformer."""
    if model.guided(SamplingOptions(STEPS, GUIDANCE)):
        return naive_eps(model, conditioning, x, t, uncond_grad)
    return model.predict(x, t, conditioning.kwargs("cond"))


def naive_flow(model, conditioning, latents, noises, path):
    timesteps = model.set_timesteps(STEPS, "cpu")
    sigmas = [float(s) for s in model.scheduler.sigmas]
    baseline = path in ("refl", "draft_lv", "drtune")  # FlowBP's baselines: the unconditional half without gradient
    v = lambda x, i: naive_velocity(model, conditioning, x, timesteps[i], not baseline)  # noqa: E731
    euler = lambda x, i, velocity: x + (sigmas[i + 1] - sigmas[i]) * velocity  # noqa: E731
    x = latents
    if path == "refl":
        for i in range(4):
            x = euler(x, i, v(x, i).detach())
        x = x.detach()
        return [(x - sigmas[4] * v(x, 4), 1.0)]
    if path == "drtune":  # every input detached, the chain not; the x0 of step DRTUNE_STOP scored
        for i in range(DRTUNE_STOP):
            velocity = v(x.detach(), i)
            x = euler(x, i, velocity if i == 1 else velocity.detach())
        return [(x - sigmas[DRTUNE_STOP] * v(x.detach(), DRTUNE_STOP), 1.0)]
    for i in range(STEPS):
        velocity = v(x, i)
        x = euler(x, i, velocity if path == "draft_lv" and i == STEPS - 1 else velocity.detach())
    if path == "draft_lv":
        last, branches = STEPS - 1, [(x, 1 / 3)]
        for noise in noises:
            noisy = sigmas[last] * noise + (1 - sigmas[last]) * x.detach()
            branches.append((euler(noisy, last, v(noisy, last)), 1 / 3))
        return branches
    noisy = sigmas[2] * noises[0] + (1 - sigmas[2]) * x.detach()
    if path == "direct_align_inversion":  # SRPO's inversion: the Euler step up from sigma_2 to sigma_1
        up = noisy + (sigmas[1] - sigmas[2]) * v(noisy, 2)
        return [((up - sigmas[1] * noises[0]) / (1 - sigmas[1]), 0.3)]
    stepped = euler(noisy, 2, v(noisy, 2))
    return [((stepped - sigmas[3] * noises[0]) / (1 - sigmas[3]), 0.3)]


@pytest.mark.parametrize("path", ["refl", "draft_lv", "drtune", "direct_align", "direct_align_inversion"])
def test_flow_matching_gradients_equal_the_naive_definition(flow64, path):
    model = flow64
    conditioning, latents, noises = inputs(model)
    options = SamplingOptions(STEPS, GUIDANCE)
    if path == "refl":
        ours = refl(model, conditioning, latents, options, 4)
    elif path == "draft_lv":
        ours = draft_lv(model, conditioning, latents, options, noises)
    elif path == "drtune":
        ours = drtune(model, conditioning, latents, options, (1, 4))
    else:
        level = model.noise_level(model.set_timesteps(STEPS, "cpu")[2])
        branch = "inversion" if path == "direct_align_inversion" else "denoise"
        ours = direct_align(model, conditioning, latents, options, level, noises[0], 0.3, branch, 0.3)
    ours_grads = grads_of(model, ours)
    naive = grads_of(model, naive_flow(model, conditioning, latents, noises, path))
    assert max(g.abs().max() for g in naive.values()) > 0
    errors = relative_errors(ours_grads, naive)
    assert max(errors.values()) <= 1e-5, f"{path}: worst relative error {max(errors.values()):.2e}"


@pytest.mark.parametrize("path", ["refl", "draft_lv", "drtune", "direct_align"])
def test_each_path_resumes_bit_for_bit(preset, tmp_path, path):
    """Every draw of a path comes from the trainer's saved streams: 1 epoch + resume == 2 epochs straight."""
    from safetensors.torch import load_file

    from alignprop.jobs import run_job

    knobs = {"gradient_paths.refl.last_steps": (1, 2), "gradient_paths.drtune.train_steps": 2}

    def config(name, epochs, **overrides):
        return small_config(
            preset, tmp_path, gradient_path=path, run_name=name, num_epochs=epochs, save_freq=1, **knobs, **overrides
        )

    _, straight, _ = run_job(config("straight", 2))
    _, first, _ = run_job(config("first", 1))
    _, second, _ = run_job(config("second", 2, resume_from=str(first)))
    expected, got = load_file(straight / "lora" / LORA_FILE), load_file(second / "lora" / LORA_FILE)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
