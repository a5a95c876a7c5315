"""Generate images on fixed latents without gradient, score them, and write what a person looks at.

The same function serves the evaluation before/after training and (later) the evaluate preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from alignprop.conditioning import encode_prompts
from alignprop.rewards import Reward
from alignprop.sampling import decode, initial_latents, sample


@dataclass
class EvalResult:
    prompts: list[str]
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1], on the CPU
    rewards: torch.Tensor  # (N,)
    metrics: dict[str, torch.Tensor]  # name -> (N,)

    @classmethod
    def merge(cls, parts: list[tuple[list[int], EvalResult]]) -> EvalResult:
        """Reassemble results computed on disjoint index sets (one per process) in index order."""
        parts = [(indices, part) for indices, part in parts if indices]  # a process may have had no share
        order = [(i, part, k) for indices, part in parts for k, i in enumerate(indices)]
        order.sort(key=lambda item: item[0])
        pick = lambda tensor_of: torch.stack([tensor_of(part)[k] for _, part, k in order])  # noqa: E731
        names = parts[0][1].metrics.keys() if parts else []
        return cls(
            prompts=[part.prompts[k] for _, part, k in order],
            images=pick(lambda part: part.images),
            rewards=pick(lambda part: part.rewards),
            metrics={name: pick(lambda part, name=name: part.metrics[name]) for name in names},
        )

    def summary(self) -> dict[str, float]:
        summary = {"reward_mean": self.rewards.mean().item(), "reward_std": self.rewards.std(unbiased=False).item()}
        for name, values in self.metrics.items():
            summary[f"{name}_mean"] = values.float().mean().item()
        return summary


def evaluation_latents(count: int, unet, scheduler, seed: int) -> torch.Tensor:
    """All evaluation latents from one CPU generator seeded with `seed`: the same whatever the batching."""
    return initial_latents(count, unet, scheduler, torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate_and_score(
    pipeline,
    unet,
    reward: Reward,
    prompts: list[str],
    config,
    batch_size: int,
    seed: int,
    indices: list[int] | None = None,
) -> EvalResult:
    """Sample prompts on seeded latents (same sampler as training, no gradient) and score them.

    Prompt i always gets latent i of the seeded draw, so a subset (`indices`, e.g. one process's share)
    produces exactly the images the full set would.
    """
    device = unet.device
    latents = evaluation_latents(len(prompts), unet, pipeline.scheduler, seed)
    indices = list(range(len(prompts))) if indices is None else list(indices)
    prompts, latents = [prompts[i] for i in indices], latents[indices]
    no_grad_plan = (False,) * config.steps
    images, rewards, metrics = [], [], {}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        final = sample(
            unet,
            pipeline.scheduler,
            encode_prompts(pipeline, chunk),
            latents[start : start + batch_size].to(device),
            no_grad_plan,
            config.sd_guidance_scale,
            eta=config.eta,
        )
        batch_images = decode(pipeline.vae, final)
        result = reward.score(batch_images, chunk)
        images.append(batch_images.cpu())
        rewards.append(result.reward.float().cpu())
        for name, values in result.metrics.items():
            metrics.setdefault(name, []).append(values.float().cpu())
    return EvalResult(
        prompts=list(prompts),
        images=torch.cat(images),
        rewards=torch.cat(rewards),
        metrics={name: torch.cat(values) for name, values in metrics.items()},
    )


def to_pil(image: torch.Tensor) -> Image.Image:
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def save_grid(rows: list[tuple[str, EvalResult]], path: Path, cell: int = 128) -> None:
    """One row per result (e.g. "before", "after"), one column per prompt, captioned with prompt | reward."""
    columns = max(len(result.prompts) for _, result in rows)
    label_width, caption_height = 70, 28
    canvas = Image.new("RGB", (label_width + columns * cell, len(rows) * (cell + caption_height)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (label, result) in enumerate(rows):
        top = row * (cell + caption_height)
        draw.text((4, top + cell // 2), label, fill="black")
        for column, (image, prompt, reward) in enumerate(zip(result.images, result.prompts, result.rewards)):
            left = label_width + column * cell
            canvas.paste(to_pil(image).resize((cell, cell), Image.NEAREST), (left, top))
            draw.text((left + 2, top + cell + 2), f"{prompt[:18]}\n{reward.item():.3g}", fill="black")
    canvas.save(path)
