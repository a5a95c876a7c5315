"""Differentiable DDIM sampling with classifier-free guidance and truncated backpropagation.

The truncation *plan* says, for each of the T steps (0 = first, noisiest), whether that step's UNet call
keeps its gradient. A step that does not is the original's `.detach()`ed UNet output: the DDIM update
stays differentiable, so gradient still flows along the latent path, but none enters the UNet there.
We run those UNet calls with autograd off, which gives the same gradients without storing (or
recomputing) anything for them; before the first kept step nothing requires grad at all, so the whole
prefix is plain inference.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch.utils.checkpoint import checkpoint

from alignprop.conditioning import Conditioning
from alignprop.errors import UserError
from alignprop.models import FoldedLoRA

STRATEGIES = ("fixed", "per_step_uniform", "uniform", "gaussian", "full")
GAUSSIAN_MAX_DRAWS = 1000
GAUSSIAN_MIN_PROBABILITY = 1e-3  # refuse settings where a valid cut is rarer than this


@dataclass(frozen=True)
class Truncation:
    """Which UNet calls keep their gradient, drawn afresh for every batch by `plan`."""

    strategy: str
    steps: int
    cut: int = 0  # fixed: steps i < cut are detached
    minmax: tuple[int, int] = (0, 50)  # per_step_uniform / uniform: inclusive range of the cut
    gaussian_mean: float = 42.0
    gaussian_std: float = 5.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown truncation strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        if self.steps < 1:
            raise UserError(f"steps must be at least 1, got {self.steps}")
        if self.strategy == "fixed" and not 0 <= self.cut <= self.steps:
            raise UserError(f"trunc_backprop_timestep={self.cut} must lie in [0, steps={self.steps}]")
        low, high = self.minmax
        if self.strategy in ("per_step_uniform", "uniform") and not 0 <= low <= high <= self.steps:
            raise UserError(
                f"truncated_backprop_minmax={tuple(self.minmax)} must satisfy 0 <= min <= max <= steps={self.steps}"
            )
        if self.strategy == "gaussian":
            self._validate_gaussian()

    def _validate_gaussian(self) -> None:
        if self.steps < 2:
            raise UserError("gaussian truncation needs steps >= 2 (its cut lies in [1, steps - 1])")
        if not self.gaussian_std > 0:
            raise UserError(f"truncation_gaussian_std must be positive, got {self.gaussian_std}")
        # int() truncates toward zero, so the cut lands in [1, T-1] iff the draw lies in [1, T).
        cdf = lambda x: 0.5 * (1 + math.erf((x - self.gaussian_mean) / (self.gaussian_std * math.sqrt(2))))  # noqa: E731
        if cdf(self.steps) - cdf(1) < GAUSSIAN_MIN_PROBABILITY:
            raise UserError(
                f"gaussian truncation N({self.gaussian_mean}, {self.gaussian_std}) almost never gives a cut in "
                f"[1, {self.steps - 1}] for steps={self.steps}; set truncation_gaussian_mean inside that range"
            )

    def plan(self, generator: torch.Generator) -> tuple[bool, ...]:
        """One plan: element i is True when step i's UNet call keeps its gradient."""
        steps = range(self.steps)
        if self.strategy == "full":
            return tuple(True for _ in steps)
        if self.strategy == "per_step_uniform":
            # The original drew a fresh cut at every step; kept steps need not be contiguous.
            low, high = self.minmax
            cuts = torch.randint(low, high + 1, (self.steps,), generator=generator).tolist()
            return tuple(i >= cut for i, cut in zip(steps, cuts))
        cut = self._draw_cut(generator)  # one cut for the whole batch
        return tuple(i >= cut for i in steps)

    def _draw_cut(self, generator: torch.Generator) -> int:
        if self.strategy == "fixed":
            return self.cut
        if self.strategy == "uniform":
            low, high = self.minmax
            return int(torch.randint(low, high + 1, (1,), generator=generator))
        for _ in range(GAUSSIAN_MAX_DRAWS):
            draw = torch.normal(self.gaussian_mean, self.gaussian_std, (1,), generator=generator).item()
            if 1 <= int(draw) <= self.steps - 1:
                return int(draw)
        raise RuntimeError(f"no gaussian cut in [1, {self.steps - 1}] after {GAUSSIAN_MAX_DRAWS} draws")


def truncation_from_config(config) -> Truncation:
    """The truncation described by a config, honouring the original's flags when the strategy is "auto"."""
    strategy = config.truncation_strategy
    if strategy == "auto":
        if not config.truncated_backprop:
            strategy = "full"
        else:
            strategy = "per_step_uniform" if config.truncated_backprop_rand else "fixed"
    return Truncation(
        strategy=strategy,
        steps=config.steps,
        cut=config.trunc_backprop_timestep,
        minmax=tuple(config.truncated_backprop_minmax),
        gaussian_mean=config.truncation_gaussian_mean,
        gaussian_std=config.truncation_gaussian_std,
    )


def initial_latents(
    batch_size: int,
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Gaussian starting latents (fp32), shaped from the UNet's config.

    Drawn on the generator's device (use a CPU generator for results that do not depend on the GPU)
    and then moved to `device`.
    """
    size = unet.config.sample_size
    shape = (batch_size, unet.config.in_channels, size, size)
    latents = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return (latents * scheduler.init_noise_sigma).to(device)


def native_precision(enabled: bool, device: torch.device):
    """Autocast off for a frozen network whose weights are already in the inference dtype.

    Under autocast, every GroupNorm/LayerNorm runs in float32 and hands float32 activations to the next
    layer (twice the bytes to move and, with gradient, to keep). With autocast off the network runs in
    its own dtype, as diffusers' inference does; peft still computes the LoRA branch in float32 (it casts
    its input to the adapter's dtype), so the trainable path keeps its precision.
    """
    if enabled and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def guided_noise(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    conditioning: Conditioning,
    guidance_scale: float,
    grad_checkpoint: bool,
    native_dtype: bool = False,
) -> torch.Tensor:
    """Classifier-free-guided noise prediction from one batched UNet call over [uncond; cond].

    At guidance 1 the guided prediction is the conditional one (uncond + 1 * (cond - uncond)): the
    unconditional half is skipped, as diffusers does, which halves the work.
    `native_dtype`: run the UNet in its weights' dtype with autocast off (see `native_precision`).
    """
    unguided = guidance_scale == 1.0
    if unguided:
        model_input, kwargs = latents.to(unet.dtype), conditioning.unet_kwargs("cond")
    else:
        model_input, kwargs = torch.cat([latents, latents]).to(unet.dtype), conditioning.guided_unet_kwargs()

    def call(sample):
        with native_precision(native_dtype, sample.device):
            return unet(sample, timestep, **kwargs).sample

    if grad_checkpoint and torch.is_grad_enabled():
        prediction = checkpoint(call, model_input, use_reentrant=False)
    else:
        prediction = call(model_input)
    prediction = prediction.to(latents.dtype)
    if unguided:
        return prediction
    uncond, cond = prediction.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def sample(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    conditioning: Conditioning,
    latents: torch.Tensor,
    keep_grad: Sequence[bool],
    guidance_scale: float,
    eta: float = 0.0,
    grad_checkpoint: bool = True,
    generator: torch.Generator | None = None,
    native_dtype: bool = False,
    fold_lora: bool = False,
) -> torch.Tensor:
    """Run len(keep_grad) DDIM steps from `latents`; return the final latents.

    Differentiable w.r.t. the LoRA weights through the steps that `keep_grad` marks (when autograd is
    enabled by the caller); under `torch.no_grad()` this is plain inference, used for evaluation.
    `generator` feeds the DDIM noise when eta > 0. `native_dtype`: see `guided_noise`.
    `fold_lora`: UNet calls without gradient run with the LoRA folded into the base weights
    (`models.FoldedLoRA`): fewer operator launches, same result up to one rounding of the folded weight.
    """
    scheduler.set_timesteps(len(keep_grad), device=latents.device)
    keeps_grad_at = [keep and torch.is_grad_enabled() for keep in keep_grad]
    folded = FoldedLoRA(unet) if fold_lora and not all(keeps_grad_at) else None
    for keeps_grad, timestep in zip(keeps_grad_at, scheduler.timesteps):
        lora_path = folded.applied() if folded and not keeps_grad else contextlib.nullcontext()
        with torch.set_grad_enabled(keeps_grad), lora_path:
            noise = guided_noise(
                unet, latents, timestep, conditioning, guidance_scale, grad_checkpoint, native_dtype=native_dtype
            )
        latents = scheduler.step(noise, timestep, latents, eta=eta, generator=generator).prev_sample
    return latents


def decode(
    vae: AutoencoderKL, latents: torch.Tensor, grad_checkpoint: bool = False, native_dtype: bool = False
) -> torch.Tensor:
    """Latents -> images in [-1, 1] (float32, NCHW).

    `native_dtype`: run the VAE in its weights' dtype with autocast off (see `native_precision`).
    """
    latents = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    latents = latents.to(vae.dtype)

    def call(z):
        with native_precision(native_dtype, z.device):
            return vae.decode(z).sample

    if grad_checkpoint and torch.is_grad_enabled() and latents.requires_grad:
        images = checkpoint(call, latents, use_reentrant=False)
    else:
        images = call(latents)
    return images.float().clamp(-1, 1)
