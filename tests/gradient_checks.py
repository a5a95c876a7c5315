"""Shared by the gradient-equivalence tests of every model family (not a test module).

`lora_grads` runs our sampler or the naive loop on a float64 model and returns the LoRA gradients of a
smooth image loss; `steps_receiving_gradient` observes with hooks which steps' denoiser outputs got gradient.
"""

from __future__ import annotations

import torch

from alignprop import models
from alignprop.lora import add_lora
from alignprop.reference import reference_sample
from alignprop.sampling import SamplingOptions, decode, initial_latents

PROMPTS = ["cat", "a red dog"]


def float64_model_with_lora(name: str, targets, rank: int = 4):
    """A short-named model in float64 with a LoRA whose B factors are non-zero (so every factor gets grad)."""
    model = models.load_model(name)
    add_lora(model.denoiser, rank=rank, alpha=rank, target_modules=targets)
    model.pipeline.to(torch.float64)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param_name, param in model.denoiser.named_parameters():
            if "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.05)
    return model


def lora_params(denoiser) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in denoiser.named_parameters() if "lora_" in n}


def run_sampler(sampler, model, conditioning, latents, keep_grad, guidance, **options):
    """Our sampler (options as `SamplingOptions` fields) or the naive loop (its keyword arguments)."""
    if sampler is reference_sample:
        return reference_sample(model, conditioning, latents, keep_grad, guidance, **options)
    return sampler(model, conditioning, latents, keep_grad, SamplingOptions(len(keep_grad), guidance, **options))


def lora_grads(model, sampler, keep_grad, guidance=5.0, **options) -> dict[str, torch.Tensor]:
    """Gradients of a simple image loss w.r.t. every LoRA tensor, for one sampler and its options."""
    params = lora_params(model.denoiser)
    for param in params.values():
        param.grad = None
    conditioning = model.encode(PROMPTS)
    latents = initial_latents(2, model, torch.Generator().manual_seed(0)).double()
    final = run_sampler(sampler, model, conditioning, latents, keep_grad, guidance, **options)
    loss = (decode(model, final) - 0.3).square().mean()  # any smooth function of the pixels
    if loss.requires_grad:
        loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}


def relative_errors(ours: dict, naive: dict) -> dict[str, float]:
    return {n: float((ours[n] - naive[n]).norm() / naive[n].norm().clamp_min(1e-30)) for n in naive}


def steps_receiving_gradient(model, sampler, keep_grad) -> set[int]:
    """Indices of steps whose denoiser output received a non-zero gradient, observed with hooks."""
    timestep_to_step, received = {}, set()

    def on_forward(module, args, kwargs, output):
        step = timestep_to_step.setdefault(int(args[1]), len(timestep_to_step))
        if output.sample.requires_grad:
            output.sample.register_hook(lambda grad: received.add(step) if grad.abs().sum() > 0 else None)

    handle = model.denoiser.register_forward_hook(on_forward, with_kwargs=True)
    try:
        lora_grads(model, sampler, keep_grad)
    finally:
        handle.remove()
    return received


def weighted_lora_grads(model, pairs) -> dict[str, torch.Tensor]:
    """LoRA gradients of sum over (latents, weight) pairs of weight * mean over each sample of
    (decode(latents) - 0.3)^2, summed over the batch; a weight is a number or one per sample."""
    params = lora_params(model.denoiser)
    for param in params.values():
        param.grad = None
    loss = 0
    for latents, weight in pairs:
        per_sample = (decode(model, latents) - 0.3).square().mean(dim=(1, 2, 3))
        loss = loss + (weight * per_sample).sum()
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
