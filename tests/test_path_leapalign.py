"""LeapAlign (alignprop.paths.leapalign) against a plain transcription of its definition, in float64.

The naive version below is FlowBP's LeapAlign (@ 93b220a flowbp/trainers/sd35/leapalign.py:330-411) written out as
a plain loop over the schedule: guidance from two separate denoiser calls (SD3; FLUX: one call), the Euler step
and the Euler leap x_k + (sigma_j - sigma_k) v_k, the reference's own straight-through sums and weights; on the DDIM
tiny model the same definition with the DDIM update and the DDIM jump from alpha_bar_k to alpha_bar_j written out.
"""

import json

import pytest
import torch
from gradient_checks import PROMPTS, float64_model_with_lora, relative_errors, weighted_lora_grads
from small_runs import assert_one_line_before_the_run_directory, small_config

from alignprop import paths
from alignprop.lora_files import LORA_FILE_NAME as LORA_FILE
from alignprop.paths.leapalign import LeapAlign
from alignprop.paths.step_draws import leap_pair
from alignprop.presets import load_preset
from alignprop.randomness import RandomStreams
from alignprop.sampling import SamplingOptions, initial_latents, sample

STEPS = 6
GUIDANCE = 5.0
ALPHA = 0.3
TAU = 1e-3  # below the tiny models' distances, so that the weights vary (at FlowBP's 0.1 both floors apply)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PAIRS = [(1, 4), (STEPS - 2, STEPS - 1)]  # the second: k = j - 1 and j the last step


@pytest.fixture(scope="module", params=["tiny_sd3", "tiny_flux", "tiny"])
def model64(request):
    return float64_model_with_lora(request.param, TARGETS)


def leapalign(**knobs) -> LeapAlign:
    config = load_preset("tiny")
    config.steps, config.gradient_path = STEPS, "leapalign"
    config.gradient_paths.leapalign.update({"alpha": ALPHA, "tau": TAU, **knobs})
    return LeapAlign(config)


def inputs(model):
    return model.encode(PROMPTS), initial_latents(2, model, torch.Generator().manual_seed(0)).double()


def ours(model, k, j, options=None, generator=None, **knobs):
    path = leapalign(**knobs)
    conditioning, latents = inputs(model)
    options = options or SamplingOptions(STEPS, GUIDANCE)
    (branch,) = path.sample(model, conditioning, latents, path.plan(k, j), options, generator=generator)
    return branch


# --- the naive transcription ---------------------------------------------------------------------------------


def naive_prediction(model, conditioning, x, t, uncond_grad=True):
    """Guidance from two separate calls; FLUX: one call, the guidance an input of the transformer."""
    if not model.guided(SamplingOptions(STEPS, GUIDANCE)):
        return model.predict(x, t, conditioning.kwargs("cond"))
    uncond = model.predict(x, t, conditioning.kwargs("uncond"))
    cond = model.predict(x, t, conditioning.kwargs("cond"))
    uncond = uncond if uncond_grad else uncond.detach()
    return uncond + GUIDANCE * (cond - uncond)


def schedule(model):
    """(step i -> i + 1, leap i -> target, clean latents at i) as plain formulas of the model's schedule."""
    timesteps = model.set_timesteps(STEPS, "cpu")
    if model.name in ("sd", "sdxl"):  # DDIM, epsilon prediction, leading spacing; alpha_bar after the last step too
        a = [float(model.scheduler.alphas_cumprod[int(t)]) for t in timesteps]
        a.append(float(model.scheduler.final_alpha_cumprod))

        def clean(x, i, eps):
            return (x - (1 - a[i]) ** 0.5 * eps) / a[i] ** 0.5

        def leap(x, eps, i, target):  # the deterministic DDIM jump from alpha_bar_i to alpha_bar_target
            return a[target] ** 0.5 * clean(x, i, eps) + (1 - a[target]) ** 0.5 * eps

        return (lambda x, i, eps: leap(x, eps, i, i + 1)), leap, clean
    sigmas = [float(s) for s in model.scheduler.sigmas]
    euler = lambda x, i, v: x + (sigmas[i + 1] - sigmas[i]) * v  # noqa: E731
    leap = lambda x, v, i, target: x + (sigmas[target] - sigmas[i]) * v  # noqa: E731
    return euler, leap, lambda x, i, v: x + (-sigmas[i]) * v


def naive_leapalign(model, conditioning, latents, k, j, alpha=ALPHA, tau=TAU, uncond_grad=True):
    """The reference's loop for one micro-batch: returns (x_dec, w, d_j, d_0, x_N)."""
    timesteps = model.set_timesteps(STEPS, "cpu")
    step, leap, clean = schedule(model)
    sg = lambda t: t.detach()  # noqa: E731
    mean_abs = lambda a, b: (a.double() - b.double()).abs().mean(dim=tuple(range(1, a.ndim)))  # noqa: E731
    x, x_hat_j, x0_hat, d_j = latents.detach(), None, None, None
    for i in range(STEPS):
        with torch.set_grad_enabled(i in (k, j)):
            if i == j:
                with torch.no_grad():
                    d_j = mean_abs(x_hat_j, x)
                x_c = x_hat_j + sg(x - x_hat_j)
                x_in = alpha * x_c + (1 - alpha) * sg(x_c) if alpha > 0 else sg(x_c)
                x = x_c
            else:
                x_in = x
            out = naive_prediction(model, conditioning, x_in, timesteps[i], uncond_grad)
            if i == k:
                x_hat_j = leap(x, out, k, j)
                out = sg(out)
            if i == j:
                x0_hat = clean(x, i, out)
                x = sg(step(x, i, out))
            else:
                x = step(x, i, out)
    x_n = sg(x)
    with torch.no_grad():
        d_0 = mean_abs(x0_hat, x_n)
        w = 1.0 / (d_j.clamp(min=tau) + d_0.clamp(min=tau))
    return x0_hat + sg(x_n - x0_hat), w, d_j, d_0, x_n


def grads_of(model, latents, weight):
    """LoRA gradients of sum_b w_b mean((decode(x_b) - 0.3)^2)."""
    return weighted_lora_grads(model, [(latents, weight)])


# --- gradients, values, weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("k, j", PAIRS)
def test_lora_gradients_equal_the_naive_definition(model64, k, j):
    conditioning, latents = inputs(model64)
    branch = ours(model64, k, j)
    x_dec, w, *_ = naive_leapalign(model64, conditioning, latents, k, j)
    expected = grads_of(model64, x_dec, w)
    assert max(g.abs().max() for g in expected.values()) > 0, "no gradient: the comparison would prove nothing"
    errors = relative_errors(grads_of(model64, branch.latents, branch.weight), expected)
    assert max(errors.values()) <= 1e-5, f"({k}, {j}): worst relative error {max(errors.values()):.2e}"


def test_without_the_unconditional_gradient_the_gradients_equal_the_naive_definition():
    model = float64_model_with_lora("tiny_sd3", TARGETS)
    conditioning, latents = inputs(model)
    branch = ours(model, 1, 4, uncond_gradient=False)
    x_dec, w, *_ = naive_leapalign(model, conditioning, latents, 1, 4, uncond_grad=False)
    expected = grads_of(model, x_dec, w)
    with_uncond = grads_of(model, *naive_leapalign(model, conditioning, latents, 1, 4)[:2])
    errors = relative_errors(grads_of(model, branch.latents, branch.weight), expected)
    assert max(errors.values()) <= 1e-5, f"worst relative error {max(errors.values()):.2e}"
    assert max(relative_errors(with_uncond, expected).values()) > 1e-3  # the knob changes the gradient


@pytest.mark.parametrize("k, j", PAIRS)
def test_the_scored_latents_are_the_plain_sample_exactly(model64, k, j):
    """Our straight-through sums keep their values exactly (x + (a - sg(a))), so the chain after j and the scored
    latents are bit-for-bit the no-grad sample (the reference's sums are off by float rounding)."""
    conditioning, latents = inputs(model64)
    branch = ours(model64, k, j)
    with torch.no_grad():
        plain = sample(model64, conditioning, latents, (False,) * STEPS, SamplingOptions(STEPS, GUIDANCE))
    assert branch.latents.requires_grad and torch.equal(branch.latents.detach(), plain)
    # the naive loop is the same chain up to its own rounding (separate guidance calls; DDIM: float64 alpha_bar
    # roots where the scheduler takes float32 ones)
    x_dec = naive_leapalign(model64, conditioning, latents, k, j)[0]
    torch.testing.assert_close(x_dec.detach(), plain, rtol=1e-6, atol=1e-6)


def test_with_ddim_noise_the_scored_latents_are_the_plain_sample():
    """eta > 0: the sampler's noise comes from the generator in the plain sampler's order (one draw per step)."""
    model = float64_model_with_lora("tiny", TARGETS)
    conditioning, latents = inputs(model)
    options = SamplingOptions(STEPS, GUIDANCE, eta=1.0)
    branch = ours(model, 1, 4, options, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = sample(model, conditioning, latents, (False,) * STEPS, options, torch.Generator().manual_seed(5))
    assert torch.equal(branch.latents.detach(), plain)


@pytest.mark.parametrize("k, j", PAIRS)
def test_the_weight_is_one_over_the_floored_distances(model64, k, j):
    conditioning, latents = inputs(model64)
    branch = ours(model64, k, j)
    _, _, d_j, d_0, _ = naive_leapalign(model64, conditioning, latents, k, j)
    expected = 1.0 / (torch.clamp(d_j, min=TAU) + torch.clamp(d_0, min=TAU))
    assert branch.weight.shape == (2,) and branch.weight.dtype == latents.dtype and not branch.weight.requires_grad
    # flow: equal to float64 rounding; DDIM: ~1e-7, the scheduler's float32 alpha_bar roots against the naive loop's
    rtol = 1e-6 if model64.name == "sd" else 1e-12
    torch.testing.assert_close(branch.weight, expected, rtol=rtol, atol=0)
    if j == k + 1:  # the leap is the ordinary step: d_j = 0, the floor applies
        assert d_j.max() <= 1e-12
        torch.testing.assert_close(branch.weight, 1.0 / (TAU + d_0.clamp(min=TAU)), rtol=rtol, atol=0)
    else:
        assert d_j.min() > TAU  # the distance itself counts
    default = ours(model64, k, j, tau=0.1).weight  # FlowBP's tau
    torch.testing.assert_close(default, 1.0 / (d_j.clamp(min=0.1) + d_0.clamp(min=0.1)), rtol=rtol, atol=0)


def test_the_leap_is_the_euler_leap_on_flow_models():
    """add_noise(denoised, implied_noise) to sigma_j == x_k + (sigma_j - sigma_k) v_k, to float64 rounding."""
    from alignprop.paths.leapalign import leap_to

    model = float64_model_with_lora("tiny_sd3", TARGETS)
    timesteps, sigmas = model.set_timesteps(STEPS, "cpu"), model.scheduler.sigmas.double()
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for k, j in [(0, 1), (0, 5), (2, 3), (3, 5)]:
        euler = x + (sigmas[j] - sigmas[k]) * v
        assert (leap_to(model, v, timesteps[k], x, timesteps[j]) - euler).abs().max() <= 1e-14


# --- which denoiser calls carry gradient ---------------------------------------------------------------------


def calls(model, k, j, uncond_gradient):
    """(step, half, output requires grad, input requires grad) of every denoiser call; half: "both" for the
    batched [uncond; cond] call, else "uncond" / "cond"."""
    conditioning, _ = inputs(model)
    uncond = conditioning.kwargs("uncond")["encoder_hidden_states"]
    timesteps = [float(t) for t in model.set_timesteps(STEPS, "cpu")]
    seen = []

    def on_forward(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        t = float((args[1] if len(args) > 1 else kwargs["timestep"]).flatten()[0])
        out = output[0] if isinstance(output, tuple) else output.sample
        embeds = kwargs["encoder_hidden_states"]
        half = "both" if x.shape[0] == 4 else ("uncond" if torch.equal(embeds, uncond) else "cond")
        step = min(range(STEPS), key=lambda i: abs(timesteps[i] - t))
        seen.append((step, half, out.requires_grad, x.requires_grad))

    handle = model.denoiser.register_forward_hook(on_forward, with_kwargs=True)
    try:
        ours(model, k, j, SamplingOptions(STEPS, GUIDANCE, grad_checkpoint=False), uncond_gradient=uncond_gradient)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny"])
def test_hooks_see_gradient_only_at_k_and_j(name):
    model = float64_model_with_lora(name, TARGETS)
    k, j = 1, 4
    seen = calls(model, k, j, uncond_gradient=True)
    assert [c[0] for c in seen] == list(range(STEPS)) and {c[1] for c in seen} == {"both"}
    # k's input is a constant (everything before it ran without gradient); j's carries the leap's gradient
    assert [c for c in seen if c[2]] == [(k, "both", True, False), (j, "both", True, True)]
    seen = calls(model, k, j, uncond_gradient=False)
    assert [c for c in seen if c[2]] == [(k, "cond", True, False), (j, "cond", True, True)]
    assert [c[:3] for c in seen if c[1] == "uncond"] == [(k, "uncond", False), (j, "uncond", False)]


# --- plans and settings --------------------------------------------------------------------------------------


def test_draw_uses_only_the_plans_stream_and_covers_every_pair():
    path, random = leapalign(), RandomStreams.seeded(0, 0)
    before, generator = random.state_dict(), torch.Generator().manual_seed(0)
    generator.set_state(random.plans.get_state())
    plans = [path.draw(random, None, None) for _ in range(600)]
    after = random.state_dict()
    assert after["prompts"] == before["prompts"] and torch.equal(after["latents"], before["latents"])
    assert [(p.k, p.j) for p in plans] == [leap_pair(STEPS, generator) for _ in range(600)]
    assert {(p.k, p.j) for p in plans} == {(k, j) for j in range(STEPS) for k in range(j)}
    plan = plans[0]
    assert plan.trained_steps() == [plan.k, plan.j] and plan.record() == {"k": plan.k, "j": plan.j}
    assert path.gradient_free_steps(plan) == plan.k


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"gradient_paths.leapalign.tau": 0.0}, "gradient_paths.leapalign.tau"),
        ({"gradient_paths.leapalign.alpha": 1.5}, "gradient_paths.leapalign.alpha"),
        ({"steps": 1, "truncated_backprop_minmax": (0, 1), "trunc_backprop_timestep": 0}, "steps >= 2"),
    ],
)
def test_bad_settings_are_one_line_before_the_run_directory(preset, tmp_path, overrides, words):
    assert_one_line_before_the_run_directory(
        small_config(preset, tmp_path, gradient_path="leapalign", **overrides), tmp_path, words
    )


def test_the_registry_names_leapalign(preset, tmp_path):
    config = small_config(preset, tmp_path, gradient_path="leapalign")
    assert "leapalign" in paths.NAMES and isinstance(paths.from_config(config, "sd3"), LeapAlign)


# --- end to end ----------------------------------------------------------------------------------------------


def flow_config(preset, tmp_path, **overrides):
    """The tiny preset on the tiny SD3 model: 4 steps, 1 update of 2 samples per epoch."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na green bird\n")
    config = small_config(preset, tmp_path, **overrides)
    config.pretrained.model = "tiny_sd3"
    config.reward_fn = "compressibility"
    config.prompt_fn = config.eval_prompt_fn = f"from_file:{prompts}"
    config.sd_guidance_scale = GUIDANCE
    config.lora.target_modules = TARGETS
    config.train.total_samples_per_epoch = 2
    config.vis_freq, config.max_vis_images = 0, 1
    return config


@pytest.mark.parametrize("model", ["tiny_sd3", "tiny"])
def test_trains_through_run_job_and_resumes_bit_for_bit(preset, tmp_path, model, capsys):
    """Every draw comes from the trainer's saved streams: 1 epoch + resume == 2 epochs straight."""
    from safetensors.torch import load_file

    from alignprop.jobs import run_job

    make = flow_config if model == "tiny_sd3" else small_config

    def config(name, epochs, **overrides):
        return make(
            preset,
            tmp_path,
            gradient_path="leapalign",
            run_name=name,
            num_epochs=epochs,
            save_freq=1,
            **{"train.total_samples_per_epoch": 2},
            **overrides,
        )

    _, straight, _ = run_job(config("straight", 2))
    lines = capsys.readouterr().out.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("gradient path:"))
    assert lines[start : start + 2] == [
        "gradient path: leapalign (alpha=0.3, tau=0.1, uncond_gradient=True)",
        f"reference: {LeapAlign.reference}",
    ]
    _, first, _ = run_job(config("first", 1))
    _, second, _ = run_job(config("second", 2, resume_from=str(first)))
    assert list((straight / "checkpoints").glob("checkpoint_*")), "no checkpoint written"
    expected, got = load_file(straight / "lora" / LORA_FILE), load_file(second / "lora" / LORA_FILE)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if "grad_norm" in r]
    assert len(updates) == 2 and all(r["grad_norm"] > 0 and r["scored"] == "final" for r in updates)
    assert all(r["gradient_calls"] == 2 and r["kept_steps"] == [[p["k"], p["j"]] for p in r["plans"]] for r in updates)
    for record in updates:
        for plan in record["plans"]:
            assert set(plan) == {"k", "j"} and 0 <= plan["k"] < plan["j"] < 4
