"""A plain transcription of the original AlignProp sampling loop: the yardstick for tests and benchmarks.

Two denoiser calls per step for classifier-free guidance, autograd on at every step, each call optionally
checkpointed, and the noise predictions `.detach()`ed where the truncation plan says so. Our sampler
(`alignprop.sampling.sample`) must give the same gradients, faster.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from alignprop.conditioning import Conditioning
from alignprop.families import Family


def reference_sample(
    model: Family,
    conditioning: Conditioning,
    latents: torch.Tensor,
    keep_grad: Sequence[bool],
    guidance_scale: float,
    eta: float = 0.0,
    grad_checkpoint: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    timesteps = model.set_timesteps(len(keep_grad), latents.device)
    for keep, timestep in zip(keep_grad, timesteps):
        model_input = latents.to(model.denoiser.dtype)
        predictions = []
        for which in ("uncond", "cond") if conditioning.uncond is not None else ("cond",):
            kwargs = conditioning.kwargs(which)
            if grad_checkpoint:
                out = checkpoint(model.predict, model_input, timestep, kwargs, use_reentrant=False)
            else:
                out = model.predict(model_input, timestep, kwargs)
            predictions.append(out.to(latents.dtype))
        if not keep:
            predictions = [prediction.detach() for prediction in predictions]
        if len(predictions) == 1:  # a family without an unconditional branch (FLUX)
            noise = predictions[0]
        else:
            uncond, cond = predictions
            noise = uncond + guidance_scale * (cond - uncond)
        latents = model.step(noise, timestep, latents, eta=eta, generator=generator)
    return latents
