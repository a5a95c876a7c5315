"""Differentiable sampling with classifier-free guidance and truncated backpropagation, and VAE decoding.

`sample` runs the family's scheduler for len(keep_grad) steps. A step whose plan entry is False (see
`alignprop.truncation`) runs its denoiser call with autograd off: its output is the original's `.detach()`ed
prediction, the scheduler update stays differentiable, so gradient still flows along the latent path but
none enters the denoiser there. That gives the original's gradients without storing (or recomputing)
anything for those calls; before the first kept step nothing requires grad at all, so the whole prefix is
plain inference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from alignprop.conditioning import Conditioning
from alignprop.families import Family


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample; the same object serves training and evaluation."""

    steps: int
    guidance_scale: float
    eta: float = 0.0  # DDIM eta (0: deterministic)
    grad_checkpoint: bool = True  # checkpoint every denoiser call that keeps its gradient
    decode_checkpoint: bool = False  # checkpoint the VAE decode too
    native_dtype: bool = False  # frozen networks in their own dtype, autocast off (see `native_precision`)


def sampling_options_from_config(config) -> SamplingOptions:
    return SamplingOptions(
        steps=config.steps,
        guidance_scale=config.sd_guidance_scale,
        eta=config.eta,
        grad_checkpoint=config.grad_checkpoint,
        decode_checkpoint=config.decode_checkpoint,
        native_dtype=config.native_dtype,
    )


def initial_latents(
    batch_size: int, model: Family, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Gaussian starting latents (fp32), drawn, scaled (and packed) as the model's family does.

    Drawn on the generator's device (use a CPU generator for results that do not depend on the GPU)
    and then moved to `device`.
    """
    shape = model.latent_shape(batch_size)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return model.prepare_noise(noise).to(device)


def seeded_latents(count: int, model: Family, seed: int) -> torch.Tensor:
    """`count` latents from one CPU generator seeded with `seed`: the same whatever the batching."""
    return initial_latents(count, model, torch.Generator().manual_seed(seed))


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


def guided_prediction(
    model: Family,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    conditioning: Conditioning,
    options: SamplingOptions,
    uncond_gradient: bool = True,
) -> torch.Tensor:
    """Classifier-free-guided prediction from one batched denoiser call over [uncond; cond] (cond alone when
    the family says no guidance); checkpointed when it keeps its gradient and `options.grad_checkpoint`.

    `uncond_gradient=False` (ReFL and the other baselines as FlowBP runs them): when autograd is on, the
    unconditional half runs in its own call without gradient and only the conditional half carries it, so
    the gradient is guidance_scale * d(cond) instead of (1 - g) d(uncond) + g d(cond)."""
    guided = model.guided(options)
    if guided and not uncond_gradient and torch.is_grad_enabled():
        with torch.no_grad():
            uncond = denoiser_call(model, latents, timestep, conditioning.kwargs("uncond"), options)
        cond = denoiser_call(model, latents, timestep, conditioning.kwargs("cond"), options)
        return uncond + options.guidance_scale * (cond - uncond)
    if not guided:
        return denoiser_call(model, latents, timestep, conditioning.kwargs("cond"), options)
    prediction = denoiser_call(model, torch.cat([latents, latents]), timestep, conditioning.guided_kwargs(), options)
    uncond, cond = prediction.chunk(2)
    return uncond + options.guidance_scale * (cond - uncond)


def denoiser_call(model: Family, latents: torch.Tensor, timestep, kwargs: dict, options: SamplingOptions):
    """One denoiser call in the denoiser's dtype, its output in `latents`' dtype; checkpointed when it keeps
    its gradient and `options.grad_checkpoint`."""

    def call(sample):
        with native_precision(options.native_dtype, sample.device):
            return model.predict(sample, timestep, kwargs)

    model_input = latents.to(model.denoiser.dtype)
    if options.grad_checkpoint and torch.is_grad_enabled():
        prediction = checkpoint(call, model_input, use_reentrant=False)
    else:
        prediction = call(model_input)
    return prediction.to(latents.dtype)


def sample(
    model: Family,
    conditioning: Conditioning,
    latents: torch.Tensor,
    keep_grad: Sequence[bool],
    options: SamplingOptions,
    generator: torch.Generator | None = None,
    start: int = 0,
    detach_input: bool = False,
    uncond_gradient: bool = True,
    stop: int | None = None,
) -> torch.Tensor:
    """Run the scheduler steps `start`..`stop` (default: the end) of a len(keep_grad)-step schedule from `latents`
    (the latents at step `start`: e.g. after a gradient-free prefix run elsewhere, `alignprop.prefix`); return the
    latents reached.

    Differentiable w.r.t. the LoRA weights through the steps that `keep_grad` marks (when autograd is
    enabled by the caller); under `torch.no_grad()` this is plain inference, used for evaluation.
    `generator` feeds the DDIM noise when eta > 0. `detach_input` (DRTune): a kept step's denoiser sees a
    detached copy of its input, so gradient enters there only through its output; `uncond_gradient`: see
    `guided_prediction`.
    """
    timesteps = model.set_timesteps(len(keep_grad), latents.device)[start:stop]
    keeps_grad_at = [keep and torch.is_grad_enabled() for keep in keep_grad[start:stop]]
    for keeps_grad, timestep in zip(keeps_grad_at, timesteps):
        with torch.set_grad_enabled(keeps_grad):
            model_input = latents.detach() if detach_input and keeps_grad else latents
            prediction = guided_prediction(model, model_input, timestep, conditioning, options, uncond_gradient)
        latents = model.step(prediction, timestep, latents, eta=options.eta, generator=generator)
    return latents


def decode(model: Family, latents: torch.Tensor, options: SamplingOptions | None = None) -> torch.Tensor:
    """Latents -> images in [-1, 1] (float32, NCHW); checkpointed when `options.decode_checkpoint`."""
    vae = model.vae
    checkpointed = options is not None and options.decode_checkpoint
    native = options is not None and options.native_dtype
    latents = model.unpack(latents) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    latents = latents.to(vae.dtype)

    def call(z):
        with native_precision(native, z.device):
            return vae.decode(z).sample

    if checkpointed and torch.is_grad_enabled() and latents.requires_grad:
        images = checkpoint(call, latents, use_reentrant=False)
    else:
        images = call(latents)
    return images.float().clamp(-1, 1)


@torch.no_grad()
def generate_images(model: Family, prompts: list[str], latents: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """One batch of images in [-1, 1] for `prompts` from `latents`: the training sampler, without gradient."""
    conditioning = model.conditioning(prompts, guided=model.guided(options))
    final = sample(model, conditioning, latents.to(model.denoiser.device), (False,) * options.steps, options)
    return decode(model, final, options)
