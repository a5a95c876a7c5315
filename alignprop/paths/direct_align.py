"""Direct-Align (`gradient_path="direct_align"`): known noise injected into the finished sample, one denoiser step
with gradient, the clean latents recovered in closed form from the known noise.

Reference: Shen et al. 2025, "Directly Aligning the Full Diffusion Trajectory with Fine-Grained Human Preference"
(SRPO), arXiv 2509.06942; code `Tencent-Hunyuan/SRPO` @ 81e5898 `fastvideo/SRPO.py` (FLUX.1-dev), with the settings
of its HPS script (`scripts/finetune/SRPO_training_hpsv2.sh`). What it does, and what this module does by default
(`gradient_paths.direct_align.levels="continuous"`, flow-matching models):

- the finished sample x0 without gradient, from the sample's own starting noise e (SRPO.py:443-521);
- a grid G of 1000 noise levels linear in sigma from `gradient_paths.direct_align.noise`'s high end to its low end
  (SRPO: the shift-3 50-step grid's steps 5 and 25, sigma 0.9643 .. 0.75; SRPO.py:523-534); s ~ U{5..995}
  (SRPO.py:864);
  gap k = min(`gradient_paths.direct_align.gap` (100), s, 1000 - s) grid points (SRPO.py:520, 528);
- denoise branch: x at level G[a], a = 1000 - s - k, is G[a] e + (1 - G[a]) x0; one model call with gradient
  there; the Euler step down to G[b], b = 1000 - s; x0 recovered there from e: (x_b - G[b] e) / (1 - G[b])
  (SRPO.py:545-608);
- inversion branch: s' = max(s - k, 1); the model called at G[b'], b' = 1000 - s', and the Euler step *up* to
  G[a'], a' = 1000 - min(s' + k, 1000), x0 recovered there (the same level as the denoise branch's when
  100 < s <= 900); scored with the reward the other way round (SRPO.py:561-620);
- discounts by grid index: d_pos = linspace(0.1, 0.25, 1000)[s] on the denoise branch, d_inv =
  linspace(0.3, 0.01, 1000)[s'] on the inversion branch (SRPO.py:415-416; `gradient_paths.direct_align.discount`,
  `gradient_paths.direct_align.inversion_discount`). With SRPO's relative reward (`rewards.relative_control`) the
  discount sits inside it: (1 + d_pos) r(positive) - r(negative), and (1 + d_inv) r(negative) - r(positive) for the
  inversion (SRPO.py:223-236, 618-620). With any other reward (SRPO has none) it weights the branch's loss;
- `gradient_paths.direct_align.branch="both"` (default): the two branches averaged (SRPO runs one per accumulation
  step with gradient_accumulation_steps 2, each loss / 2; SRPO.py:529-625); "denoise" or "inversion" alone.

`gradient_paths.direct_align.levels="sampler"` (the only choice on DDIM families, and "auto" picks it there): the
sampler's own
levels instead of the fine grid: noise injected at the sampler step whose level is nearest u ~ U(min, max), the
denoise branch steps down to the next sampler level and the inversion branch up to the previous one from that same
level (recovering x0 at two levels), discounts linear in u. Differences from SRPO that remain: SRPO's branches run
at guidance 3.5 while its rollout runs at its `train_guidence`, here both use `sd_guidance_scale`; SRPO truncates
the model's timestep to int(1000 sigma) / 1000, here it is 1000 sigma.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from alignprop.errors import UserError
from alignprop.paths.base import Branch, Calls, GradientPath, Plan, flags, fresh_noise, one_step, rollout, uniform_int
from alignprop.sampling import guided_prediction

NOISE_SOURCES = ("initial", "fresh")
BRANCHES = ("denoise", "inversion", "both")
LEVELS = ("auto", "continuous", "sampler")
GRID = 1000  # SRPO's timestep_length: points on the continuous grid
EDGE = 5  # s ~ U{EDGE..GRID - EDGE} (SRPO.py:864)


@dataclass(frozen=True)
class DirectAlignPlan(Plan):
    index: int = 0  # continuous: SRPO's s; sampler: the sampler step
    level: float = 0.0  # sampler: the drawn noise level u
    discount: float = 0.0  # the denoise branch's (d_pos)
    inversion_discount: float = 0.0  # the inversion branch's (d_inv)
    noise: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def record(self) -> dict:
        return {
            "index": self.index,
            "level": self.level,
            "discount": self.discount,
            "inversion_discount": self.inversion_discount,
        }


class DirectAlign(GradientPath):
    name = "direct_align"
    reference = "Direct-Align (SRPO), arXiv 2509.06942; Tencent-Hunyuan/SRPO @ 81e5898 fastvideo/SRPO.py"

    def __init__(self, config, family: str = ""):
        super().__init__(config, family)
        knobs = config.gradient_paths.direct_align
        self.noise_range, self.gap = tuple(knobs.noise), knobs.gap
        self.discount, self.inversion_discount = tuple(knobs.discount), tuple(knobs.inversion_discount)
        self.branch, self.noise_source, levels = knobs.branch, knobs.noise_source, knobs.levels
        self.continuous = levels == "continuous" or (levels == "auto" and family in ("sd3", "flux"))
        self.relative = bool(tuple(config.rewards.get("relative_control", ())))

    @staticmethod
    def check(config) -> None:
        knobs, steps = config.gradient_paths.direct_align, config.steps
        low, high = knobs.noise
        if not 0 < low <= high < 1:
            raise UserError(f"gradient_paths.direct_align.noise={(low, high)} must satisfy 0 < min <= max < 1")
        for key, choices in (("branch", BRANCHES), ("noise_source", NOISE_SOURCES), ("levels", LEVELS)):
            if knobs[key] not in choices:
                raise UserError(
                    f"gradient_paths.direct_align.{key}={knobs[key]!r}; choose one of: {', '.join(choices)}"
                )
        if knobs.levels == "sampler":
            check_sampler_inversion(knobs.branch, steps)
        check_branch_weights(knobs, relative=bool(tuple(config.rewards.get("relative_control", ()))))

    def check_model(self, model) -> None:
        if self.continuous and model.name not in ("sd3", "flux"):
            raise UserError(
                f"gradient_paths.direct_align.levels='continuous' needs a flow-matching model (SD3, FLUX); this "
                f"{model.name} model samples with DDIM: use 'sampler' (or 'auto')"
            )
        if not self.continuous:  # "auto" resolved to the sampler's levels for this family
            check_sampler_inversion(self.branch, self.steps)

    def settings(self) -> dict:
        levels = {"levels": "continuous", "gap": self.gap} if self.continuous else {"levels": "sampler"}
        return {
            **levels,
            "noise": self.noise_range,
            "branch": self.branch,
            "discount": self.discount,
            "inversion_discount": self.inversion_discount,
            "discount_in": "relative reward" if self.relative else "loss weight",
            "noise_source": self.noise_source,
        }

    # --- plans ---------------------------------------------------------------------------------------------

    def draw(self, random, model, latents) -> DirectAlignPlan:
        if self.continuous:
            plan = self.continuous_plan(uniform_int(EDGE, GRID - EDGE, random.plans), None)
        else:
            low, high = self.noise_range
            level = low + (high - low) * float(torch.rand((), generator=random.plans, dtype=torch.float64))
            plan = self.sampler_plan(model, level, None, latents.device)
        noise = latents if self.noise_source == "initial" else fresh_noise(model, latents, random.latents)
        return replace(plan, noise=noise)

    def continuous_plan(self, s: int, noise) -> DirectAlignPlan:
        """SRPO's draw s on the 1000-point grid; discounts indexed by s (denoise) and s' (inversion)."""
        inverted_index = max(s - self.gap_at(s), 1)
        d_pos = by_index(self.discount, s)
        d_inv = by_index(self.inversion_discount, inverted_index)
        return DirectAlignPlan(flags(self.steps, ()), s, 0.0, d_pos, d_inv, noise)

    def sampler_plan(self, model, level: float, noise, device) -> DirectAlignPlan:
        timesteps = model.set_timesteps(self.steps, device)
        step = nearest_step(model, timesteps, level)
        if self.branch != "denoise":
            step = max(step, first_invertible_step(model, timesteps))
        d_pos = linear_discount(level, self.noise_range, self.discount)
        d_inv = linear_discount(level, self.noise_range, self.inversion_discount)
        return DirectAlignPlan(flags(self.steps, {step}), step, level, d_pos, d_inv, noise)

    def denoiser_calls(self, plan) -> Calls:
        return self.expected_calls()  # the same for every plan

    def expected_calls(self) -> Calls:
        # the whole chain without gradient, then one guided call per branch with both CFG halves' gradient
        return Calls(2 if self.branch == "both" else 1, self.steps)

    def gap_at(self, s: int) -> int:
        return min(GRID - s, self.gap, s)

    def gradient_free_steps(self, plan) -> int:
        return self.steps  # the whole chain runs without gradient

    # --- sampling ------------------------------------------------------------------------------------------

    def sample(self, model, conditioning, latents, plan, options, start=0, generator=None):
        clean = rollout(model, conditioning, latents, options, start, generator=generator)
        noise = plan.noise.to(clean.dtype)
        pairs = self.continuous_branches if self.continuous else self.sampler_branches
        denoised, inverted = pairs(model, conditioning, clean, noise, plan, options)
        share = 0.5 if self.branch == "both" else 1.0
        branches = []
        if self.branch in ("denoise", "both"):
            branches.append(self.scored("denoise", denoised, share, plan.discount, inverted=False))
        if self.branch in ("inversion", "both"):
            branches.append(self.scored("inversion", inverted, share, plan.inversion_discount, inverted=True))
        return branches

    def scored(self, name, latents, share, discount, inverted) -> Branch:
        """The discount inside a relative reward (SRPO), else as the loss weight."""
        if self.relative:
            return Branch(name, latents, share, inverted, positive_boost=discount)
        return Branch(name, latents, share * discount, inverted)

    def continuous_branches(self, model, conditioning, clean, noise, plan, options):
        """SRPO's two branches on the fine grid (flow matching: x_sigma = sigma e + (1 - sigma) x0)."""
        s, k = plan.index, self.gap_at(plan.index)
        grid = torch.linspace(*reversed(self.noise_range), GRID, dtype=torch.float64).tolist()
        want = self.branch
        denoised = inverted = None
        if want in ("denoise", "both"):
            denoised = flow_branch(model, conditioning, clean, noise, grid[GRID - s - k], grid[GRID - s], options)
        if want in ("inversion", "both"):
            s_inv = max(s - k, 1)
            start, end = grid[GRID - s_inv], grid[GRID - min(s_inv + k, GRID)]
            inverted = flow_branch(model, conditioning, clean, noise, start, end, options)
        return denoised, inverted

    def sampler_branches(self, model, conditioning, clean, noise, plan, options):
        """The sampler's own levels: down to the next level, or up to the previous one, from step `plan.index`."""
        timesteps = model.set_timesteps(options.steps, clean.device)
        step = plan.index
        noisy = model.add_noise(clean, noise, timesteps[step])
        denoised = inverted = None
        if self.branch in ("denoise", "both"):
            stepped = one_step(model, conditioning, noisy, timesteps[step], options)
            denoised = model.clean_after_step(stepped, noise, timesteps[step])
        if self.branch in ("inversion", "both"):
            up = inversion_step(model, conditioning, noisy, timesteps[step], timesteps[step - 1], options)
            inverted = model.clean_at(up, noise, timesteps[step - 1])
        return denoised, inverted


def check_branch_weights(knobs, relative: bool) -> None:
    """Without a relative reward a branch's discount is its loss weight: (0, 0) makes it a denoiser call with
    gradient that changes nothing (both branches: no update changes the weights). Refused."""
    if relative:  # the discount is a boost inside the relative reward: 0 is SRPO's reward without it
        return
    for name, key in (("denoise", "discount"), ("inversion", "inversion_discount")):
        if knobs.branch in (name, "both") and not any(knobs[key]):
            raise UserError(
                f"gradient_paths.direct_align.{key}=(0, 0) weights the {name} branch's loss by 0 (without "
                "rewards.relative_control the discount is the loss weight): no update changes the weights through "
                f"it; give a positive weight or branch={'inversion' if name == 'denoise' else 'denoise'!r}"
            )


def check_sampler_inversion(branch: str, steps: int) -> None:
    """On the sampler's levels an inversion steps up a level, never to pure noise: it needs 3 steps."""
    if branch != "denoise" and steps < 3:
        raise UserError(
            f"gradient_paths.direct_align.branch={branch!r} needs steps >= 3 on the sampler's levels "
            "(the inversion steps up a level, never to pure noise)"
        )


def flow_branch(model, conditioning, clean, noise, sigma, target, options):
    """Noise `noise` put on `clean` at level `sigma`; one denoiser call with gradient there; the Euler step to
    `target` (down or up); the clean latents recovered at `target` from the known noise."""
    noisy = sigma * noise + (1 - sigma) * clean
    timestep = torch.tensor(sigma * 1000, dtype=torch.float32, device=clean.device)
    velocity = guided_prediction(model, noisy, timestep, conditioning, options)
    stepped = noisy + (target - sigma) * velocity
    return (stepped - target * noise) / (1 - target)


def by_index(ends: tuple[float, float], index: int) -> float:
    """linspace(ends[0], ends[1], GRID)[index], in float64 (SRPO's discount tables)."""
    return ends[0] + (ends[1] - ends[0]) * index / (GRID - 1)


def linear_discount(level: float, noise_range: tuple[float, float], weights: tuple[float, float]) -> float:
    """The sampler-level discount: linear in the noise level, weights[0] at the range's low end, weights[1] at its
    high end."""
    low, high = noise_range
    fraction = 0.0 if high == low else (level - low) / (high - low)
    return weights[0] + (weights[1] - weights[0]) * fraction


def nearest_step(model, timesteps, level: float) -> int:
    """The sampler step whose noise level is nearest `level`."""
    return min(range(len(timesteps)), key=lambda i: abs(model.noise_level(timesteps[i]) - level))


def first_invertible_step(model, timesteps) -> int:
    """The first step an inversion can start from: the level it steps up to must hold some signal (flow
    matching's first level is sigma = 1, pure noise, from which nothing can be recovered)."""
    return 1 if model.noise_level(timesteps[0]) < 1 else 2


def inversion_step(model, conditioning, latents, timestep, noisier_timestep, options):
    """One deterministic step *up* from `timestep`'s level to `noisier_timestep`'s, with gradient: the clean
    latents and the noise that the prediction implies, put back together at the noisier level (DDIM inversion;
    for flow matching this is the Euler step x + (sigma' - sigma) v)."""
    prediction = guided_prediction(model, latents, timestep, conditioning, options)
    clean = model.denoised(prediction, timestep, latents)
    return model.add_noise(clean, model.implied_noise(clean, timestep, latents), noisier_timestep)
