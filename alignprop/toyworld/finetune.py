"""AlignProp on the toy world in a few lines: LoRA, differentiable DDIM, a reward, truncated backprop.

The same pieces the training loop (`alignprop.train`) is built from: `models.add_lora`, `sampling.sample`
with a `Truncation` plan, `sampling.decode`, `conditioning.encode_prompts` and a registered reward. Kept
free of the run directory, accelerate and checkpoints so that tests and experiments can fine-tune and
measure in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignprop import models
from alignprop.conditioning import encode_prompts
from alignprop.rewards.base import Reward
from alignprop.sampling import Truncation, decode, initial_latents, sample

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class Settings:
    steps: int = 20  # DDIM steps
    guidance: float = 5.0
    batch_size: int = 16
    updates: int = 20
    learning_rate: float = 3e-3
    max_grad_norm: float = 1.0
    lora_rank: int = 4
    seed: int = 0


def add_adapter(pipeline, rank: int, seed: int) -> list[torch.nn.Parameter]:
    """LoRA on the attention projections; its random initialisation drawn from `seed`, not the global state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.add_lora(pipeline.unet, rank, rank, LORA_TARGETS)


def update_step(pipeline, reward: Reward, prompts: list[str], keep_grad, settings: Settings, generator) -> dict:
    """One forward pass with gradient through the kept steps; returns the loss and the reward's outputs."""
    unet, scheduler = pipeline.unet, pipeline.scheduler
    latents = initial_latents(len(prompts), unet, scheduler, generator, unet.device)
    final = sample(
        unet, scheduler, encode_prompts(pipeline, prompts), latents, keep_grad, settings.guidance, grad_checkpoint=False
    )
    result = reward.score(decode(pipeline.vae, final), prompts)
    return {"loss": result.loss.float().mean(), "result": result}


def finetune(
    pipeline,
    reward: Reward,
    prompts: list[str],
    truncation: Truncation,
    settings: Settings,
    on_update: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Add a LoRA to the pipeline's UNet and train it for `settings.updates` updates; one record per update."""
    params = add_adapter(pipeline, settings.lora_rank, settings.seed)
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)  # prompts, latents and plans, in a fixed order
    records = []
    for update in range(1, settings.updates + 1):
        started = time.perf_counter()
        picks = torch.randint(len(prompts), (settings.batch_size,), generator=generator).tolist()
        keep_grad = truncation.plan(generator)
        out = update_step(pipeline, reward, [prompts[i] for i in picks], keep_grad, settings, generator)
        if out["loss"].requires_grad:  # False only when the plan kept no step
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        result = out["result"]
        record = {
            "update": update,
            "reward": result.reward.float().mean().item(),
            "loss": out["loss"].item(),
            "kept_steps": sum(keep_grad),
            "seconds": time.perf_counter() - started,
            **{name: values.float().mean().item() for name, values in result.metrics.items()},
        }
        records.append(record)
        if on_update is not None:
            on_update(record)
    return records
