"""Gradient paths: which denoiser calls of a training sample carry the reward's gradient, and what is scored.

`gradient_path` (config) names one; "truncation" is AlignProp's own (`alignprop.truncation`, run by
`alignprop.sampling.sample`). The others, each a few lines against the family's seam (`guided_prediction`,
`step`, and the closed-form schedule hooks `denoised`, `add_noise`, `clean_after_step`, `noise_level`):

- refl (ImageReward's ReFL): sample without gradient up to the k-th step from the end, k ~ U{min..max}; one
  denoiser call there with gradient; its predicted x0 is decoded and scored.
- draft_lv (DRaFT-LV): the sample with K=1 (only the last denoiser call keeps its gradient), plus n re-noisings
  of the stop-gradient final sample to the last timestep, each denoised by one step with gradient; the n + 1
  rewards are summed.
- drtune (DRTune): K evenly spaced steps (interval T // K, a random offset in [0, interval)) keep their
  gradient, and the denoiser *input* is detached at each of them: gradient enters the denoiser only from its
  output and flows on along the sampler's update path.
- direct_align (SRPO's Direct-Align): the final sample without gradient; known noise injected at the sampler
  step whose noise level is nearest u ~ U(min, max); one denoiser step with gradient; the clean latents
  recovered in closed form from the known noise; the loss weighted by a discount linear in u. Branches
  (`direct_align_branch`): "denoise" steps down to the next level; "inversion" (SRPO's second branch) injects
  the noise at that step's level, steps *up* to the previous, noisier level with the same prediction and
  scores the recovered image with the reward's sign flipped (SRPO's gradient descent on the reward there;
  the upward step's Jacobian has the opposite sign, so both branches push the prediction the same way);
  "both" runs the two from one noise at one evaluated step, each with its own discount.

Every random draw comes from the trainer's streams (`plans` for steps and levels, `latents` for noise), so
runs stay reproducible and resumable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from alignprop.errors import UserError
from alignprop.rewards.base import RewardResult
from alignprop.sampling import decode, guided_prediction, initial_latents

PATHS = ("truncation", "refl", "draft_lv", "drtune", "direct_align")
NOISE_SOURCES = ("initial", "fresh")
DIRECT_ALIGN_BRANCHES = ("denoise", "inversion", "both")


class Branch(NamedTuple):
    """Clean latents to decode and score, with their loss weight; `inverted`: scored with the reward negated."""

    latents: torch.Tensor
    weight: float
    inverted: bool = False


@dataclass(frozen=True)
class PathSample:
    """What one gradient path produced: its branches and which steps' denoiser calls carried gradient."""

    branches: list[Branch]
    trained: tuple[bool, ...]  # steps (0 = first, noisiest) whose denoiser call carried gradient


# --- validation (runtime.validate, before the run directory exists) -----------------------------------------


def check(config) -> None:
    """One UserError line for the first bad gradient-path setting."""
    path, steps = config.gradient_path, config.steps
    if path not in PATHS:
        raise UserError(f"gradient_path={path!r}; choose one of: {', '.join(PATHS)}")
    knobs = config.gradient_paths
    low, high = knobs.refl_last_steps
    if path == "refl" and not 1 <= low <= high <= steps:
        raise UserError(
            f"gradient_paths.refl_last_steps={(low, high)} must satisfy 1 <= min <= max <= steps={steps} "
            "(k-th step from the end; 1 = the last)"
        )
    if path == "draft_lv" and knobs.draft_lv_renoise < 1:
        raise UserError(f"gradient_paths.draft_lv_renoise must be >= 1 re-noisings, got {knobs.draft_lv_renoise}")
    if path == "drtune" and not 1 <= knobs.drtune_train_steps <= steps:
        raise UserError(f"gradient_paths.drtune_train_steps={knobs.drtune_train_steps} must lie in [1, steps={steps}]")
    low, high = knobs.direct_align_noise
    if path == "direct_align" and not 0 < low <= high < 1:
        raise UserError(f"gradient_paths.direct_align_noise={(low, high)} must satisfy 0 < min <= max < 1")
    if path == "direct_align" and knobs.direct_align_branch not in DIRECT_ALIGN_BRANCHES:
        raise UserError(
            f"gradient_paths.direct_align_branch={knobs.direct_align_branch!r}; "
            f"choose one of: {', '.join(DIRECT_ALIGN_BRANCHES)}"
        )
    if path == "direct_align" and knobs.direct_align_branch != "denoise" and steps < 3:
        raise UserError(
            f"gradient_paths.direct_align_branch={knobs.direct_align_branch!r} needs steps >= 3 "
            "(the inversion steps up a level, never to pure noise)"
        )
    if path == "direct_align" and knobs.direct_align_noise_source not in NOISE_SOURCES:
        raise UserError(
            f"gradient_paths.direct_align_noise_source={knobs.direct_align_noise_source!r}; "
            f"choose one of: {', '.join(NOISE_SOURCES)}"
        )


# --- plans: the random choices of one micro-batch ------------------------------------------------------------


def refl_step(steps: int, last_steps: tuple[int, int], generator: torch.Generator) -> int:
    """The trained step's index: the k-th from the end, k ~ U{min..max} (ImageReward: 40 steps, k in 1..10)."""
    low, high = last_steps
    return steps - int(torch.randint(low, high + 1, (1,), generator=generator))


def drtune_steps(steps: int, train_steps: int, generator: torch.Generator) -> tuple[int, ...]:
    """K evenly spaced step indices: offset s ~ U{0..interval-1}, then s + j * interval, interval = T // K."""
    interval = steps // train_steps
    offset = int(torch.randint(0, interval, (1,), generator=generator))
    return tuple(offset + j * interval for j in range(train_steps))


def direct_align_level(noise_range: tuple[float, float], generator: torch.Generator) -> float:
    low, high = noise_range
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def discount(level: float, noise_range: tuple[float, float], weights: tuple[float, float]) -> float:
    """SRPO's discount: linear in the noise level, weights[0] at the range's low end, weights[1] at its high end."""
    low, high = noise_range
    fraction = 0.0 if high == low else (level - low) / (high - low)
    return weights[0] + (weights[1] - weights[0]) * fraction


def nearest_step(model, timesteps, level: float) -> int:
    """The sampler step whose noise level is nearest `level`."""
    return min(range(len(timesteps)), key=lambda i: abs(model.noise_level(timesteps[i]) - level))


# --- the paths ---------------------------------------------------------------------------------------------


def denoise(model, conditioning, latents, timesteps, options, generator=None, trained=(), detach_input=False):
    """Sampler steps over `timesteps`; the denoiser calls at indices `trained` keep their gradient (with
    `detach_input`, on a detached copy of their input), the others run without autograd. The update path
    stays differentiable, as in `alignprop.sampling.sample`."""
    for index, timestep in enumerate(timesteps):
        keeps = index in trained and torch.is_grad_enabled()
        with torch.set_grad_enabled(keeps):
            model_input = latents.detach() if detach_input else latents
            prediction = guided_prediction(model, model_input, timestep, conditioning, options)
        latents = model.step(prediction, timestep, latents, eta=options.eta, generator=generator)
    return latents


def flags(steps: int, trained) -> tuple[bool, ...]:
    return tuple(i in trained for i in range(steps))


def refl(model, conditioning, latents, options, step: int, generator=None) -> PathSample:
    timesteps = model.set_timesteps(options.steps, latents.device)
    with torch.no_grad():
        latents = denoise(model, conditioning, latents, timesteps[:step], options, generator)
    prediction = guided_prediction(model, latents, timesteps[step], conditioning, options)
    clean = model.denoised(prediction, timesteps[step], latents)
    return PathSample([Branch(clean, 1.0)], flags(options.steps, {step}))


def one_step(model, conditioning, latents, timestep, options):
    """One deterministic sampler step whose denoiser call keeps its gradient."""
    prediction = guided_prediction(model, latents, timestep, conditioning, options)
    return model.step(prediction, timestep, latents, eta=0.0)


def draft_lv(model, conditioning, latents, options, noises: list[torch.Tensor], generator=None) -> PathSample:
    steps = options.steps
    timesteps = model.set_timesteps(steps, latents.device)
    final = denoise(model, conditioning, latents, timesteps, options, generator, trained={steps - 1})
    branches = [Branch(final, 1.0)]
    last = timesteps[-1]
    for noise in noises:
        noisy = model.add_noise(final.detach(), noise.to(final.dtype), last)
        branches.append(Branch(one_step(model, conditioning, noisy, last, options), 1.0))
    return PathSample(branches, flags(steps, {steps - 1}))


def drtune(model, conditioning, latents, options, trained: tuple[int, ...], generator=None) -> PathSample:
    timesteps = model.set_timesteps(options.steps, latents.device)
    final = denoise(
        model, conditioning, latents, timesteps, options, generator, trained=set(trained), detach_input=True
    )
    return PathSample([Branch(final, 1.0)], flags(options.steps, trained))


def direct_align(
    model,
    conditioning,
    latents,
    options,
    level: float,
    noise,
    weight: float,
    generator=None,
    branch="denoise",
    inversion_weight: float = 0.0,
) -> PathSample:
    """SRPO's Direct-Align at the step nearest `level` (a branch with an inversion starts no earlier than
    `first_invertible_step`: it steps up to the level before it)."""
    timesteps = model.set_timesteps(options.steps, latents.device)
    with torch.no_grad():
        clean = denoise(model, conditioning, latents, timesteps, options, generator)
    step = nearest_step(model, timesteps, level)
    if branch != "denoise":
        step = max(step, first_invertible_step(model, timesteps))
    noise = noise.to(clean.dtype)
    noisy = model.add_noise(clean, noise, timesteps[step])
    branches = []
    if branch in ("denoise", "both"):
        stepped = one_step(model, conditioning, noisy, timesteps[step], options)
        branches.append(Branch(model.clean_after_step(stepped, noise, timesteps[step]), weight))
    if branch in ("inversion", "both"):
        inverted = inversion_step(model, conditioning, noisy, timesteps[step], timesteps[step - 1], options)
        branches.append(Branch(model.clean_at(inverted, noise, timesteps[step - 1]), inversion_weight, True))
    return PathSample(branches, flags(options.steps, {step}))


def first_invertible_step(model, timesteps) -> int:
    """The first step an inversion can start from: the level it steps up to must hold some signal (flow
    matching's first level is sigma = 1, pure noise, from which nothing can be recovered)."""
    return 1 if model.noise_level(timesteps[0]) < 1 else 2


def inversion_step(model, conditioning, latents, timestep, noisier_timestep, options):
    """One deterministic step *up* from `timestep`'s level to `noisier_timestep`'s, with gradient: the clean
    latents and the noise that the prediction implies, put back together at the noisier level (DDIM inversion;
    for flow matching this is the Euler step x + (sigma' - sigma) v that SRPO's inversion branch takes)."""
    prediction = guided_prediction(model, latents, timestep, conditioning, options)
    clean = model.denoised(prediction, timestep, latents)
    return model.add_noise(clean, model.implied_noise(clean, timestep, latents), noisier_timestep)


def run(config, model, conditioning, latents, options, random) -> PathSample:
    """The configured path on one micro-batch, its random choices drawn from the trainer's streams."""
    path, knobs, steps = config.gradient_path, config.gradient_paths, options.steps
    if path == "refl":
        step = refl_step(steps, tuple(knobs.refl_last_steps), random.plans)
        return refl(model, conditioning, latents, options, step, random.latents)
    if path == "draft_lv":
        noises = [fresh_noise(model, latents, random.latents) for _ in range(knobs.draft_lv_renoise)]
        return draft_lv(model, conditioning, latents, options, noises, random.latents)
    if path == "drtune":
        trained = drtune_steps(steps, knobs.drtune_train_steps, random.plans)
        return drtune(model, conditioning, latents, options, trained, random.latents)
    if path == "direct_align":
        noise_range = tuple(knobs.direct_align_noise)
        level = direct_align_level(noise_range, random.plans)
        weight = discount(level, noise_range, tuple(knobs.direct_align_discount))
        inversion_weight = discount(level, noise_range, tuple(knobs.direct_align_inversion_discount))
        noise = latents if knobs.direct_align_noise_source == "initial" else fresh_noise(model, latents, random.latents)
        return direct_align(
            model,
            conditioning,
            latents,
            options,
            level,
            noise,
            weight,
            random.latents,
            branch=knobs.direct_align_branch,
            inversion_weight=inversion_weight,
        )
    raise UserError(f"gradient_path={path!r}; choose one of: {', '.join(PATHS)}")


def negated(result: RewardResult) -> RewardResult:
    """The reward with its sign flipped (loss -> -loss, reward -> -reward): SRPO scores its inversion branch
    with the relative reward's two prompts swapped, gradient descent where the denoise branch ascends."""
    return RewardResult(-result.loss, -result.reward, result.metrics)


def fresh_noise(model, latents, generator) -> torch.Tensor:
    """Gaussian noise drawn as the starting latents are (scaled by init_noise_sigma, 1 for DDIM and flow
    matching; packed for FLUX), from `generator`."""
    return initial_latents(latents.shape[0], model, generator, latents.device).to(latents.dtype)


def sample_and_score(trainer, batch, shape_loss):
    """`Trainer.sample_and_score` for a path other than truncation: (loss, first branch's RewardResult, trained
    steps, first branch's images). The loss is the batch mean of the weighted sum over branches of the shaped
    per-sample loss, times `train.loss_coeff`."""
    config, model, options = trainer.config, trainer.model, trainer.options
    with trainer.accelerator.autocast():
        conditioning = model.conditioning(batch.prompts, guided=model.guided(options))
        outcome = run(config, model, conditioning, batch.latents, options, trainer.random)
        total, first = 0, None
        for branch in outcome.branches:
            images = decode(model, branch.latents, options)
            result = trainer.reward.score(images, batch.prompts)
            total = total + branch.weight * shape_loss(negated(result) if branch.inverted else result).float()
            first = first or (result, images)
    loss = total.mean() * config.train.loss_coeff
    return loss, first[0], outcome.trained, first[1]
