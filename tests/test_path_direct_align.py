"""Direct-Align on SRPO's continuous levels (alignprop/paths/direct_align.py) against a plain transcription of
`Tencent-Hunyuan/SRPO` `fastvideo/SRPO.py`'s two branches, in float64 on the tiny flow models; its discounts, its
gap at the grid's edges, the discount inside SRPO's relative reward, and the family checks."""

import pytest
import torch
from gradient_checks import PROMPTS, float64_model_with_lora, lora_params, relative_errors
from test_flow_families import TARGETS

from alignprop import paths
from alignprop.errors import UserError
from alignprop.paths.base import Branch, negated
from alignprop.paths.base import score as score_branch
from alignprop.presets import load_preset
from alignprop.rewards.base import Reward, RewardResult
from alignprop.rewards.relative import Relative
from alignprop.sampling import SamplingOptions, decode, initial_latents

STEPS = 4
GUIDANCE = {"tiny_sd3": 5.0, "tiny_flux": 3.5}
LOW, HIGH = 0.75, 0.9642857


@pytest.fixture(scope="module", params=["tiny_sd3", "tiny_flux"])
def flow64(request):
    model = float64_model_with_lora(request.param, TARGETS)
    return request.param, model


def config_for(**knobs):
    config = load_preset("tiny")
    config.steps, config.gradient_path = STEPS, "direct_align"
    for key, value in knobs.items():
        config.gradient_paths.direct_align[key] = value
    return config


def naive_velocity(model, conditioning, x, sigma, guidance, t=None):
    """The guided velocity at a continuous level (the model's timestep 1000 sigma, or `t`): two calls (SD3) or one
    with the guidance embedded (FLUX)."""
    t = torch.tensor(sigma * 1000, dtype=torch.float32) if t is None else t
    if model.guided(SamplingOptions(STEPS, guidance)):
        uncond = model.predict(x, t, conditioning.kwargs("uncond"))
        cond = model.predict(x, t, conditioning.kwargs("cond"))
        return uncond + guidance * (cond - uncond)
    return model.predict(x, t, conditioning.kwargs("cond"))


def naive_rollout(model, conditioning, x, guidance):
    """The sampler's Euler chain without gradient, on the scheduler's float32 sigmas (their differences taken in
    float32, as the scheduler and SRPO do)."""
    timesteps = model.set_timesteps(STEPS, "cpu")
    sigmas = model.scheduler.sigmas
    with torch.no_grad():
        for i in range(STEPS):
            velocity = naive_velocity(model, conditioning, x, None, guidance, t=timesteps[i])
            x = x + float(sigmas[i + 1] - sigmas[i]) * velocity
    return x


def naive_srpo(model, conditioning, x0, eps, s, guidance, d_pos, d_inv):
    """SRPO.py:520-625 with gradient_accumulation_steps 2: the denoise branch (i = 1), then the inversion (i = 0),
    each loss halved; discounts as loss weights (a plain reward)."""
    grid = [HIGH + (LOW - HIGH) * j / 999 for j in range(1000)]
    k = min(1000 - s, 100, s)
    branches = []
    for inversion in (1, 0):
        mid = max(s - k, 1) if inversion == 0 else s
        a, b = 1000 - min(mid + k, 1000), 1000 - mid
        start, end = (a, b) if inversion == 1 else (b, a)
        x = (grid[start] * eps + (1 - grid[start]) * x0).detach()
        x = x + (grid[end] - grid[start]) * naive_velocity(model, conditioning, x, grid[start], guidance)
        weight = (d_pos[s] if inversion == 1 else d_inv[mid]) / 2
        branches.append(((x - grid[end] * eps) / (1 - grid[end]), weight))
    return branches


def grads_of(model, pairs):
    params = lora_params(model.denoiser)
    for param in params.values():
        param.grad = None
    loss = sum(weight * (decode(model, latents) - 0.3).square().mean() for latents, weight in pairs)
    loss.backward()
    return {n: p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize("s", [50, 500, 950])  # the lower edge (gap s, levels one index apart), inside, upper edge
def test_continuous_branches_equal_srpos_code(flow64, s):
    name, model = flow64
    options = SamplingOptions(STEPS, GUIDANCE[name])
    conditioning = model.encode(PROMPTS, guided=model.guided(options))
    latents = initial_latents(2, model, torch.Generator().manual_seed(0)).double()
    path = paths.from_config(config_for(levels="continuous"), model.name)
    plan = path.continuous_plan(s, latents)
    ours = path.sample(model, conditioning, latents, plan, options)
    d_pos, d_inv = torch.linspace(0.1, 0.25, 1000).tolist(), torch.linspace(0.3, 0.01, 1000).tolist()
    x0 = naive_rollout(model, conditioning, latents, GUIDANCE[name])
    naive = naive_srpo(model, conditioning, x0, latents, s, GUIDANCE[name], d_pos, d_inv)
    assert [b.name for b in ours] == ["denoise", "inversion"] and [b.inverted for b in ours] == [False, True]
    assert [b.weight for b in ours] == pytest.approx([w for _, w in naive], rel=1e-6)
    for branch, (latents_naive, _) in zip(ours, naive):
        assert torch.allclose(branch.latents, latents_naive, rtol=0, atol=1e-10)
    expected = grads_of(model, naive)
    errors = relative_errors(grads_of(model, [(b.latents, b.weight) for b in ours]), expected)
    assert max(g.abs().max() for g in expected.values()) > 0
    assert max(errors.values()) <= 1e-5, f"s={s}: worst relative error {max(errors.values()):.2e}"


def test_gap_and_discounts_follow_srpos_indices():
    path = paths.from_config(config_for(levels="continuous"), "flux")
    for s, gap in ((5, 5), (100, 100), (500, 100), (950, 50), (995, 5)):
        plan = path.continuous_plan(s, None)
        assert path.gap_at(s) == gap
        assert plan.discount == pytest.approx(0.1 + 0.15 * s / 999)
        assert plan.inversion_discount == pytest.approx(0.3 - 0.29 * max(s - gap, 1) / 999)
    drawn = {path.draw(_streams(), None, torch.zeros(1)).index for _ in range(1)}
    assert drawn <= set(range(5, 996))


def _streams():
    from alignprop.randomness import RandomStreams

    return RandomStreams.seeded(3, 0)


class PromptLength(Reward):
    """A text-conditioned stand-in with a known closed form: r = mean(image) * len(prompt); loss 1 - r."""

    def score(self, images, prompts):
        lengths = torch.tensor([float(len(p)) for p in prompts], dtype=images.dtype)
        reward = images.mean(dim=(1, 2, 3)) * lengths
        return RewardResult(1 - reward, reward.detach())


def test_the_discount_sits_inside_the_relative_reward():
    """SRPO.py:223-236: (1 + k) r(positive) - r(negative); the inversion branch (1 + k) r(negative) - r(positive)."""
    images = torch.rand(2, 3, 4, 4, requires_grad=True)
    prompts = ["a cat", "two dogs"]
    relative = Relative(PromptLength(), "Real.", "Painting.")
    mean = images.mean(dim=(1, 2, 3)).detach()
    pos = torch.tensor([len("Real. a cat"), len("Real. two dogs")], dtype=torch.float32) * mean
    neg = torch.tensor([len("Painting. a cat"), len("Painting. two dogs")], dtype=torch.float32) * mean
    down = score_branch(relative, Branch("denoise", None, positive_boost=0.2), images, prompts)
    up = score_branch(relative, Branch("inversion", None, inverted=True, positive_boost=0.2), images, prompts)
    assert torch.allclose(down.reward, 1.2 * pos - neg) and torch.allclose(up.reward, 1.2 * neg - pos)
    plain = score_branch(PromptLength(), Branch("inversion", None, inverted=True, positive_boost=0.2), images, prompts)
    assert torch.allclose(plain.reward, negated(PromptLength().score(images, prompts)).reward)


def test_with_a_relative_reward_the_discount_is_no_loss_weight():
    config = config_for(levels="continuous")
    config.rewards.relative_control = ("Real.", "Painting.")
    path = paths.from_config(config, "flux")
    plan = path.continuous_plan(500, None)
    denoise = path.scored("denoise", None, 0.5, plan.discount, inverted=False)
    assert denoise.weight == 0.5 and denoise.positive_boost == plan.discount
    plain = paths.from_config(config_for(levels="continuous"), "flux")
    assert plain.scored("denoise", None, 0.5, plan.discount, inverted=False).weight == 0.5 * plan.discount


def test_levels_follow_the_family_and_continuous_needs_a_flow_model():
    assert paths.from_config(config_for(), "flux").continuous
    assert not paths.from_config(config_for(), "sd").continuous
    ddim = float64_model_with_lora("tiny", ("to_q",))
    with pytest.raises(UserError) as error:
        paths.from_config(config_for(levels="continuous"), "sd").check_model(ddim)
    assert "direct_align.levels" in str(error.value) and "\n" not in str(error.value)
