"""Prompt control: generate images for toy-world captions and let the checker grade them.

Uses the project's own sampler (`alignprop.sampling`), so what is measured here is what AlignProp trains.
"""

from __future__ import annotations

import torch

from alignprop.evaluate import evaluation_latents, generate_images
from alignprop.toyworld import checker
from alignprop.toyworld.captions import caption, parse
from alignprop.toyworld.world import all_combinations

STEPS = 30
GUIDANCE = 5.0


def all_captions() -> list[str]:
    """The 90 captions of the world, in a fixed order."""
    return [caption(shape, colour, background) for shape, colour, background in all_combinations()]


def generate(
    pipeline, prompts: list[str], seed: int, steps: int = STEPS, guidance: float = GUIDANCE, batch_size: int = 128
) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [-1, 1] for `prompts`; image i always starts from latent i of `seed`'s draw."""
    latents = evaluation_latents(len(prompts), pipeline.unet, pipeline.scheduler, seed)
    images = [
        generate_images(
            pipeline,
            pipeline.unet,
            prompts[start : start + batch_size],
            latents[start : start + batch_size],
            steps,
            guidance,
        ).cpu()
        for start in range(0, len(prompts), batch_size)
    ]
    return torch.cat(images)


def grade(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """The checker's accuracies (background, colour, shape, prompt = all three) against the prompts."""
    return checker.accuracy(checker.check(images), [parse(p) for p in prompts])


def prompt_control(pipeline, prompts: list[str], seed: int, **sampling) -> dict[str, float]:
    return grade(generate(pipeline, prompts, seed, **sampling), prompts)
