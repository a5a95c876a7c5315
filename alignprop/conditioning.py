"""Prompt conditioning: what the UNet needs besides the latents and the timestep.

Kept behind one object so that a model family with more conditioning (SDXL: a second text encoder,
pooled embeddings, time ids) changes only this module, not the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline


@dataclass
class Conditioning:
    """Text embeddings of a batch of prompts and of the empty prompt (for classifier-free guidance)."""

    cond: torch.Tensor  # (B, tokens, dim)
    uncond: torch.Tensor  # (B, tokens, dim)

    def __len__(self) -> int:
        return self.cond.shape[0]

    def guided_unet_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for one batched UNet call over [uncond; cond]."""
        return {"encoder_hidden_states": torch.cat([self.uncond, self.cond])}

    def unet_kwargs(self, which: str) -> dict[str, torch.Tensor]:
        """Keyword arguments for a single UNet call on `which` in {"cond", "uncond"}."""
        return {"encoder_hidden_states": getattr(self, which)}


@torch.no_grad()
def encode_prompts(pipeline: StableDiffusionPipeline, prompts: list[str]) -> Conditioning:
    """Encode prompts with the pipeline's own (frozen) text encoder; the empty prompt is the negative."""
    cond, uncond = pipeline.encode_prompt(
        prompts, pipeline.text_encoder.device, num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    return Conditioning(cond=cond, uncond=uncond)
