"""Model families: every place where Stable Diffusion 1.x/2.x and SDXL (and later the flow-matching
families) differ, behind one object.

A `Family` wraps a loaded pipeline and answers, for the sampler and the trainer:

    encode(prompts, guided)            -> Conditioning   prompt encoding and extra conditioning
    predict(latents, t, kwargs)        -> model output   the denoiser call
    set_timesteps / step(...)                            the scheduler
    latent_shape(batch)                                   the starting latents' shape
    save_lora(directory, layers, meta)                    the LoRA file layout

The family is chosen from the model itself: `model_index.json`'s pipeline class. Adding a family is
adding a subclass here and its pipeline class to `FAMILIES`; the SD1.5 path is not edited.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from alignprop.conditioning import Conditioning
from alignprop.errors import UserError


class Family:
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, DDIM (epsilon or v-prediction)."""

    name = "sd"
    pipeline_class = StableDiffusionPipeline
    denoiser_name = "unet"  # the pipeline attribute that holds the denoiser (and the LoRA file's key prefix)
    frozen_names = ("vae", "text_encoder", "unet")
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}  # no NSFW filter while training

    def __init__(self, pipeline):
        self.pipeline = pipeline

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    @property
    def vae(self):
        return self.pipeline.vae

    # --- loading ------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """DDIM with the model's own schedule and prediction type; frozen eval-mode modules; no progress bars."""
        self.pipeline.scheduler = DDIMScheduler.from_config(self.pipeline.scheduler.config)
        for name in self.frozen_names:
            module = getattr(self.pipeline, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        self.pipeline.set_progress_bar_config(disable=True)

    # --- sampling -----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: list[str], guided: bool = True) -> Conditioning:
        """The pipeline's own (frozen) prompt encoding; the empty prompt is the negative."""
        device = self.pipeline.text_encoder.device
        cond, uncond = self.pipeline.encode_prompt(prompts, device, 1, do_classifier_free_guidance=guided)
        wrap = lambda embeds: None if embeds is None else {"encoder_hidden_states": embeds}  # noqa: E731
        return Conditioning(cond=wrap(cond), uncond=wrap(uncond), batch_size=len(prompts))

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict) -> torch.Tensor:
        return self.denoiser(latents, timestep, **kwargs).sample

    def set_timesteps(self, steps: int, device: torch.device) -> torch.Tensor:
        self.scheduler.set_timesteps(steps, device=device)
        return self.scheduler.timesteps

    def step(self, output, timestep, latents, eta: float = 0.0, generator: torch.Generator | None = None):
        return self.scheduler.step(output, timestep, latents, eta=eta, generator=generator).prev_sample

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        config = self.denoiser.config
        return (batch_size, config.in_channels, config.sample_size, config.sample_size)

    @property
    def init_noise_sigma(self) -> float:
        return self.scheduler.init_noise_sigma

    # --- LoRA files ---------------------------------------------------------------------------------

    def save_lora(self, directory: Path, layers: dict, metadata: dict) -> None:
        """`pytorch_lora_weights.safetensors` in the family's diffusers layout, with the adapter metadata
        (without it a reload with lora_alpha != rank differs)."""
        prefix = self.denoiser_name
        self.pipeline_class.save_lora_weights(
            directory,
            **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": metadata},
            safe_serialization=True,
        )


class StableDiffusionXL(Family):
    """SDXL: two CLIP text encoders (the second with a projection: pooled embeddings), size/crop time ids."""

    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    frozen_names = ("vae", "text_encoder", "text_encoder_2", "unet")
    load_kwargs = {}

    @property
    def image_size(self) -> tuple[int, int]:
        side = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return side, side

    @torch.no_grad()
    def encode(self, prompts: list[str], guided: bool = True) -> Conditioning:
        """`StableDiffusionXLPipeline.encode_prompt` (negatives zeroed when `force_zeros_for_empty_prompt`, as the
        pipeline does) and `_get_add_time_ids` for original size = target size = the model's size, crop (0, 0)."""
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


FAMILIES = (Family, StableDiffusionXL)


def family_class(pipeline_class_name: str) -> type[Family]:
    """The family of a pipeline class named in `model_index.json`."""
    for family in FAMILIES:
        if family.pipeline_class.__name__ == pipeline_class_name:
            return family
    known = ", ".join(f.pipeline_class.__name__ for f in FAMILIES)
    raise UserError(f"unsupported pipeline {pipeline_class_name!r}; supported: {known}")


def family_of(pipeline) -> Family:
    """The family object for a loaded pipeline."""
    return family_class(type(pipeline).__name__)(pipeline)
