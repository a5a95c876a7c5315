"""SDXL: two CLIP text encoders (the second with a projection: pooled embeddings) and size/crop time ids."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from alignprop.conditioning import Conditioning
from alignprop.families.base import Family


class StableDiffusionXL(Family):
    """SDXL: two CLIP text encoders (the second with a projection: pooled embeddings), size/crop time ids."""

    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    frozen_names = ("vae", "text_encoder", "text_encoder_2", "unet")
    text_encoder_names = ("text_encoder", "text_encoder_2")
    load_kwargs = {}

    @torch.no_grad()
    def encode(self, prompts: list[str], guided: bool = True) -> Conditioning:
        """`StableDiffusionXLPipeline.encode_prompt` (negatives zeroed when `force_zeros_for_empty_prompt`, as the
        pipeline does) and `_get_add_time_ids` for original size = target size = the image size (`resolution`, else
        the model's own), crop (0, 0), as the stock pipeline does with `height` / `width`."""
        pipeline = self.pipeline
        device = pipeline.text_encoder_2.device
        cond, uncond, pooled, uncond_pooled = pipeline.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided
        )
        time_ids = pipeline._get_add_time_ids(
            self.image_size,
            (0, 0),
            self.image_size,
            dtype=cond.dtype,
            text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim,
        ).to(device)
        time_ids = time_ids.repeat(len(prompts), 1)

        def wrap(embeds, pooled_embeds):
            if embeds is None:
                return None
            added = {"text_embeds": pooled_embeds, "time_ids": time_ids}
            return {"encoder_hidden_states": embeds, "added_cond_kwargs": added}

        return Conditioning(
            cond=wrap(cond, pooled), uncond=wrap(uncond, uncond_pooled) if guided else None, batch_size=len(prompts)
        )
