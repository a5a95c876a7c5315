"""Prompt control: generate images for toy-world captions and let the checker grade them.

Uses the project's own sampler (`alignprop.sampling`), so what is measured here is what AlignProp trains.
"""

from __future__ import annotations

import torch

from alignprop.families import family_of
from alignprop.sampling import SamplingOptions, generate_images, seeded_latents
from alignprop.toyworld import checker
from alignprop.toyworld.captions import caption, parse
from alignprop.toyworld.world import SHAPES, all_combinations

STEPS = 30
GUIDANCE = 5.0


def all_captions() -> list[str]:
    """The 90 captions of the world, in a fixed order."""
    return [caption(shape, colour, background) for shape, colour, background in all_combinations()]


def generate(
    pipeline,
    prompts: list[str],
    seed: int,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
    tokens: int = 0,
    batch_size: int = 128,
) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [-1, 1] for `prompts`; image i always starts from latent i of `seed`'s draw.
    `tokens`: the T5 prompt length of a flow model (`pretrained.max_sequence_length`; 0: the pipeline's default)."""
    model, options = family_of(pipeline), SamplingOptions(steps=steps, guidance_scale=guidance)
    if tokens:
        model.set_max_sequence_length(tokens)
    latents = seeded_latents(len(prompts), model, seed)
    images = [
        generate_images(model, prompts[start : start + batch_size], latents[start : start + batch_size], options).cpu()
        for start in range(0, len(prompts), batch_size)
    ]
    return torch.cat(images)


def grade(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """The checker's accuracies (background, colour, shape, prompt = all three) against the prompts, and the shape
    accuracy per requested shape ("shape_square": the fraction of squares asked for that read as squares)."""
    requests = [parse(p) for p in prompts]
    right = checker.correctness(checker.check(images), requests)
    result = {name: values.float().mean().item() for name, values in right.items()}
    for shape in SHAPES:
        asked = torch.tensor([request.shape == shape for request in requests])
        if asked.any():
            result[f"shape_{shape}"] = right["shape"][asked].float().mean().item()
    return result


def prompt_control(pipeline, prompts: list[str], seed: int, **sampling) -> dict[str, float]:
    return grade(generate(pipeline, prompts, seed, **sampling), prompts)
