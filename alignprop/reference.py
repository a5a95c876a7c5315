"""A plain transcription of the original AlignProp sampling loop: the yardstick for tests and benchmarks.

Two UNet calls per step for classifier-free guidance, autograd on at every step, each call optionally
checkpointed, and the noise predictions `.detach()`ed where the truncation plan says so. Our sampler
(`alignprop.sampling.sample`) must give the same gradients, faster.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from alignprop.conditioning import Conditioning


def reference_sample(
    unet,
    scheduler,
    conditioning: Conditioning,
    latents: torch.Tensor,
    keep_grad: Sequence[bool],
    guidance_scale: float,
    eta: float = 0.0,
    grad_checkpoint: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    scheduler.set_timesteps(len(keep_grad), device=latents.device)
    for keep, timestep in zip(keep_grad, scheduler.timesteps):
        model_input = latents.to(unet.dtype)
        predictions = []
        for which in ("uncond", "cond"):
            kwargs = conditioning.unet_kwargs(which)
            if grad_checkpoint:
                out = checkpoint(unet, model_input, timestep, use_reentrant=False, **kwargs).sample
            else:
                out = unet(model_input, timestep, **kwargs).sample
            predictions.append(out.to(latents.dtype))
        uncond, cond = predictions
        if not keep:
            uncond, cond = uncond.detach(), cond.detach()
        noise = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(noise, timestep, latents, eta=eta, generator=generator).prev_sample
    return latents
