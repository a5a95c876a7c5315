"""Gradient paths (alignprop.gradient_paths) against plain transcriptions of their definitions, in float64.

The naive versions below use autograd everywhere, two denoiser calls per step for guidance, the DDIM update and
the forward process written out from alpha_bar, and `.detach()` exactly where each definition stops the gradient.
"""

import json

import pytest
import torch
from gradient_checks import PROMPTS, float64_model_with_lora, lora_params, relative_errors
from small_runs import small_config

from alignprop import gradient_paths as paths
from alignprop.errors import UserError
from alignprop.lora_files import LORA_FILE_NAME as LORA_FILE
from alignprop.rewards import RewardResult
from alignprop.rewards.shaping import shaped_loss
from alignprop.sampling import SamplingOptions, decode, initial_latents

STEPS = 6
GUIDANCE = 5.0
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module", params=["tiny", "tiny_sdxl"])
def model64(request):
    return float64_model_with_lora(request.param, TARGETS)


# --- the naive transcriptions ------------------------------------------------------------------------------


def naive_eps(model, conditioning, x, t):
    """Classifier-free guidance from two separate denoiser calls (epsilon prediction)."""
    uncond = model.predict(x, t, conditioning.kwargs("uncond"))
    cond = model.predict(x, t, conditioning.kwargs("cond"))
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
    eps = naive_eps(model, conditioning, x, timesteps[step])
    return [((x - (1 - a[step]) ** 0.5 * eps) / a[step] ** 0.5, 1.0)]


def naive_draft_lv(model, conditioning, x, noises):
    timesteps, a = alpha_bars(model)
    final = naive_chain(model, conditioning, x, keep={STEPS - 1})
    branches = [(final, 1.0)]
    for noise in noises:
        noisy = a[-2] ** 0.5 * final.detach() + (1 - a[-2]) ** 0.5 * noise
        branches.append((ddim(naive_eps(model, conditioning, noisy, timesteps[-1]), a[-2], a[-1], noisy), 1.0))
    return branches


def naive_drtune(model, conditioning, x, trained):
    return [(naive_chain(model, conditioning, x, keep=set(trained), detach_input_at=set(trained)), 1.0)]


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


def inputs(model):
    conditioning = model.encode(PROMPTS)
    latents = initial_latents(2, model, torch.Generator().manual_seed(0)).double()
    noises = [initial_latents(2, model, torch.Generator().manual_seed(10 + i)).double() for i in range(2)]
    return conditioning, latents, noises


def grads_of(model, branches):
    params = lora_params(model.denoiser)
    for param in params.values():
        param.grad = None
    loss = sum(branch[1] * (decode(model, branch[0]) - 0.3).square().mean() for branch in branches)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}


def ours_and_naive(model, path):
    conditioning, latents, noises = inputs(model)
    options = SamplingOptions(STEPS, GUIDANCE)
    if path == "refl":
        ours = paths.refl(model, conditioning, latents, options, 4)
        naive = naive_refl(model, conditioning, latents, 4)
    elif path == "draft_lv":
        ours = paths.draft_lv(model, conditioning, latents, options, noises)
        naive = naive_draft_lv(model, conditioning, latents, noises)
    elif path == "drtune":
        ours = paths.drtune(model, conditioning, latents, options, (1, 4))
        naive = naive_drtune(model, conditioning, latents, (1, 4))
    else:
        timesteps = model.set_timesteps(STEPS, "cpu")
        level = model.noise_level(timesteps[2])  # exactly step 2's level
        ours = paths.direct_align(model, conditioning, latents, options, level, noises[0], 0.3)
        naive = naive_direct_align(model, conditioning, latents, 2, noises[0], 0.3)
    return grads_of(model, ours.branches), grads_of(model, naive), ours


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
    ours = paths.direct_align(
        model64, conditioning, latents, SamplingOptions(STEPS, GUIDANCE), level, noises[0], 0.3, None, branch, 0.7
    )
    naive = naive_direct_align_inversion(model64, conditioning, latents, 2, noises[0], 0.7)
    if branch == "both":
        naive = naive_direct_align(model64, conditioning, latents, 2, noises[0], 0.3) + naive
    assert [branch.inverted for branch in ours.branches] == ([False, True] if branch == "both" else [True])
    expected = grads_of(model64, naive)
    errors = relative_errors(grads_of(model64, ours.branches), expected)
    assert max(g.abs().max() for g in expected.values()) > 0
    assert max(errors.values()) <= 1e-5, f"{branch}: worst relative error {max(errors.values()):.2e}"


def test_the_inversion_branch_is_scored_with_the_reward_negated():
    """SRPO swaps the relative reward's prompts there: threshold loss relu(t + r), gradient descent on r."""
    reward = torch.tensor([0.2, 0.9], requires_grad=True)
    result = RewardResult(loss=1 - reward, reward=reward.detach())
    loss = shaped_loss(paths.negated(result), "threshold", 0.7)
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
        sample = paths.direct_align(model, conditioning, latents, options, level, noises[0], 1.0, None, branch, 1.0)
        grads = grads_of(model, [(b.latents, sign) for b in sample.branches])
        return torch.cat([g.flatten() for g in grads.values()])

    denoise, inversion = flat_grads("denoise", 1.0), flat_grads("inversion", -1.0)
    assert torch.nn.functional.cosine_similarity(denoise, inversion, dim=0) > 0.5


def test_flow_inversion_never_steps_up_to_pure_noise(flow64):
    conditioning, latents, noises = inputs(flow64)
    timesteps = flow64.set_timesteps(STEPS, "cpu")
    options = SamplingOptions(STEPS, GUIDANCE)
    sample = paths.direct_align(flow64, conditioning, latents, options, 1.0, noises[0], 1.0, None, "inversion", 1.0)
    assert sample.trained.index(True) == 2 and flow64.noise_level(timesteps[0]) == 1.0
    assert torch.isfinite(sample.branches[0].latents).all()


def test_drtune_detaches_the_input_rather_than_the_chain(model64):
    """DRTune differs from plain sparse truncation (input not detached): the gradients must differ."""
    conditioning, latents, _ = inputs(model64)
    ours = grads_of(
        model64, paths.drtune(model64, conditioning, latents, SamplingOptions(STEPS, GUIDANCE), (1, 4)).branches
    )
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
        return paths.refl(model, conditioning, latents, options, 4)
    if path == "draft_lv":
        return paths.draft_lv(model, conditioning, latents, options, noises)
    if path == "drtune":
        return paths.drtune(model, conditioning, latents, options, (1, 4))
    level = model.noise_level(model.set_timesteps(STEPS, "cpu")[2])
    return paths.direct_align(model, conditioning, latents, options, level, noises[0], 1.0)


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


def test_drtune_steps_are_evenly_spaced_with_a_random_offset():
    generator = torch.Generator().manual_seed(0)
    plans = {paths.drtune_steps(50, 5, generator) for _ in range(200)}
    assert plans == {tuple(s + 10 * j for j in range(5)) for s in range(10)}


def test_refl_step_lies_in_the_configured_range():
    generator = torch.Generator().manual_seed(0)
    assert {paths.refl_step(40, (1, 10), generator) for _ in range(500)} == set(range(30, 40))  # ImageReward's


def test_direct_align_discount_is_linear_in_the_level():
    assert paths.discount(0.75, (0.75, 0.95), (0.1, 0.25)) == pytest.approx(0.1)
    assert paths.discount(0.85, (0.75, 0.95), (0.1, 0.25)) == pytest.approx(0.175)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"gradient_path": "refl", "gradient_paths.refl_last_steps": (1, 5)}, "refl_last_steps"),  # steps = 4
        ({"gradient_path": "draft_lv", "gradient_paths.draft_lv_renoise": 0}, "draft_lv_renoise"),
        ({"gradient_path": "drtune", "gradient_paths.drtune_train_steps": 5}, "drtune_train_steps"),
        ({"gradient_path": "direct_align", "gradient_paths.direct_align_noise": (0.5, 1.0)}, "direct_align_noise"),
        ({"gradient_path": "direct_align", "gradient_paths.direct_align_noise": (0.0, 0.5)}, "direct_align_noise"),
        ({"gradient_path": "nope"}, "gradient_path"),
        ({"eval_reward_fns": "compressibility,nope"}, "eval_reward_fns"),
    ],
)
def test_bad_settings_are_one_line_before_the_run_directory(preset, tmp_path, overrides, words):
    from alignprop.runtime import validate

    config = small_config(preset, tmp_path, **overrides)
    with pytest.raises(UserError) as error:
        validate(config, num_processes=1)
    message = str(error.value)
    assert words in message and "\n" not in message
    assert not (tmp_path / "logs").exists()


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
def test_each_path_trains_through_run_job_and_writes_a_checkpoint(preset, tmp_path, path):
    from alignprop.jobs import run_job

    config = small_config(
        preset,
        tmp_path,
        gradient_path=path,
        num_epochs=1,
        save_freq=1,
        reward_loss="threshold" if path == "refl" else "reward",
        eval_reward_fns="compressibility,colorfulness",
        **{"gradient_paths.refl_last_steps": (1, 2), "gradient_paths.drtune_train_steps": 2},
    )
    _, run_dir, _ = run_job(config)
    assert list((run_dir / "checkpoints").glob("checkpoint_1*")), "no checkpoint written"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if "grad_norm" in r]
    assert len(updates) == 2 and all(r["grad_norm"] > 0 for r in updates)
    evaluations = [r for r in records if r.get("eval")]
    assert evaluations and all("heldout_compressibility_mean" in r for r in evaluations)


# --- flow matching (SD3): the same paths on the Euler step, x_sigma = sigma * noise + (1 - sigma) * x0 --------


@pytest.fixture(scope="module", params=["tiny_sd3", "tiny_flux"])
def flow64(request):
    return float64_model_with_lora(request.param, TARGETS)


def naive_velocity(model, conditioning, x, t):
    """SD3: classifier-free guidance from two calls; FLUX: one call, the guidance an input of the transformer."""
    if model.guided(SamplingOptions(STEPS, GUIDANCE)):
        return naive_eps(model, conditioning, x, t)
    return model.predict(x, t, conditioning.kwargs("cond"))


def naive_flow(model, conditioning, latents, noises, path):
    timesteps = model.set_timesteps(STEPS, "cpu")
    sigmas = [float(s) for s in model.scheduler.sigmas]
    v = lambda x, i: naive_velocity(model, conditioning, x, timesteps[i])  # noqa: E731
    euler = lambda x, i, velocity: x + (sigmas[i + 1] - sigmas[i]) * velocity  # noqa: E731
    x, keep = latents, {"draft_lv": {STEPS - 1}, "drtune": {1, 4}}.get(path, set())
    if path == "refl":
        for i in range(4):
            x = euler(x, i, v(x, i).detach())
        x = x.detach()
        return [(x - sigmas[4] * v(x, 4), 1.0)]
    for i in range(STEPS):
        velocity = v(x.detach() if path == "drtune" and i in keep else x, i)
        x = euler(x, i, velocity if i in keep else velocity.detach())
    if path == "drtune":
        return [(x, 1.0)]
    if path == "draft_lv":
        last, branches = STEPS - 1, [(x, 1.0)]
        for noise in noises:
            noisy = sigmas[last] * noise + (1 - sigmas[last]) * x.detach()
            branches.append((euler(noisy, last, v(noisy, last)), 1.0))
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
        ours = paths.refl(model, conditioning, latents, options, 4)
    elif path == "draft_lv":
        ours = paths.draft_lv(model, conditioning, latents, options, noises)
    elif path == "drtune":
        ours = paths.drtune(model, conditioning, latents, options, (1, 4))
    else:
        level = model.noise_level(model.set_timesteps(STEPS, "cpu")[2])
        branch = "inversion" if path == "direct_align_inversion" else "denoise"
        ours = paths.direct_align(model, conditioning, latents, options, level, noises[0], 0.3, None, branch, 0.3)
    ours_grads = grads_of(model, ours.branches)
    naive = grads_of(model, naive_flow(model, conditioning, latents, noises, path))
    assert max(g.abs().max() for g in naive.values()) > 0
    errors = relative_errors(ours_grads, naive)
    assert max(errors.values()) <= 1e-5, f"{path}: worst relative error {max(errors.values()):.2e}"


@pytest.mark.parametrize("path", ["refl", "draft_lv", "drtune", "direct_align"])
def test_each_path_resumes_bit_for_bit(preset, tmp_path, path):
    """Every draw of a path comes from the trainer's saved streams: 1 epoch + resume == 2 epochs straight."""
    from safetensors.torch import load_file

    from alignprop.jobs import run_job

    knobs = {"gradient_paths.refl_last_steps": (1, 2), "gradient_paths.drtune_train_steps": 2}

    def config(name, epochs, **overrides):
        return small_config(
            preset, tmp_path, gradient_path=path, run_name=name, num_epochs=epochs, save_freq=1, **knobs, **overrides
        )

    _, straight, _ = run_job(config("straight", 2))
    _, first, _ = run_job(config("first", 1))
    _, second, _ = run_job(config("second", 2, resume_from=str(first)))
    expected, got = load_file(straight / "lora" / LORA_FILE), load_file(second / "lora" / LORA_FILE)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
