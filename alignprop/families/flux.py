"""FLUX.1 dev and schnell: a flow-matching transformer over 2x2-packed latents, CLIP pooled + T5 prompts.

No classifier-free guidance: FLUX.1 has no unconditional branch. FLUX.1-dev is guidance-distilled, its guidance scale
is an input of the transformer (an embedding): `sd_guidance_scale` goes there (the stock pipeline's default is 3.5),
and every step is one call on the prompts alone. FLUX.1-schnell has no guidance input; a `sd_guidance_scale` other
than 1 is ignored there, with a one-time warning (the stock pipeline ignores it silently).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from alignprop.conditioning import Conditioning
from alignprop.families.sd3 import FlowMatching

logger = logging.getLogger(__name__)

STOCK_GUIDANCE = 3.5  # FluxPipeline.__call__'s default guidance_scale


class Flux(FlowMatching):
    """FLUX.1: 1-stream + 2-stream transformer blocks, packed latents, rotary ids, dev's guidance embedding."""

    name = "flux"
    pipeline_class = FluxPipeline
    denoiser_name = "transformer"
    frozen_names = ("vae", "text_encoder", "text_encoder_2", "transformer")
    text_encoder_names = ("text_encoder", "text_encoder_2")
    max_sequence_length = 512  # FluxPipeline's default (FLUX.1-schnell was trained with 256)

    def __init__(self, pipeline):
        super().__init__(pipeline)
        self.guidance_scale = STOCK_GUIDANCE  # set from the sampling options by `guided`
        self._warned_schnell = False

    @property
    def has_guidance_embedding(self) -> bool:
        """FLUX.1-dev: True; FLUX.1-schnell: False."""
        return bool(self.denoiser.config.guidance_embeds)

    @property
    def native_size(self) -> tuple[int, int]:
        """The VAE's configured sample size: 1024 for FLUX.1-dev and -schnell, what the stock pipeline's fixed
        `default_sample_size` (128 latents) gives them; a small test model declares its own."""
        side = int(self.vae.config.sample_size)
        return side, side

    def size_rule(self) -> tuple[int, str]:
        """`FluxPipeline` packs 2x2 latents into a token: sides in multiples of the VAE's factor x 2 (it would round
        other sizes down, with a warning; refused here instead)."""
        factor = self.pipeline.vae_scale_factor
        return 2 * factor, f"the VAE's factor {factor} x 2 for the 2x2 packing of latents into tokens"

    @property
    def latent_size(self) -> tuple[int, int]:
        """`FluxPipeline.prepare_latents`: the VAE's latents, rounded down to even sides for the 2x2 packing."""
        factor = self.pipeline.vae_scale_factor
        return tuple(2 * (int(side) // (factor * 2)) for side in self.image_size)

    # --- options ----------------------------------------------------------------------------------

    def guided(self, options) -> bool:
        """Never CFG. Records `options.guidance_scale` as dev's embedded guidance, which `predict` passes (the
        sampler asks `guided(options)` at every step, the trainer and the evaluator before encoding)."""
        self.check_options(options)
        self.guidance_scale = float(options.guidance_scale)
        if not self.has_guidance_embedding and options.guidance_scale != 1 and not self._warned_schnell:
            logger.warning(
                "this FLUX model (schnell) has no guidance input: sd_guidance_scale=%s is ignored "
                "(set it to 1 to silence this)",
                options.guidance_scale,
            )
            self._warned_schnell = True
        return False

    # --- sampling ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: list[str], guided: bool = True) -> Conditioning:
        """`FluxPipeline.encode_prompt` (CLIP pooled, T5 to `max_sequence_length` tokens) and the rotary
        ids of text and image tokens. No unconditional branch (`guided` is ignored). dev's guidance is not part of
        the conditioning (prompts may be encoded once, before the options are known): `predict` adds it."""
        pipeline = self.pipeline
        embeds, pooled, text_ids = pipeline.encode_prompt(
            prompts,
            None,
            device=pipeline.text_encoder.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        height, width = self.latent_size
        image_ids = pipeline._prepare_latent_image_ids(
            len(prompts), height // 2, width // 2, text_ids.device, embeds.dtype
        )
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        shared = {"txt_ids": text_ids, "img_ids": image_ids}
        return Conditioning(cond=cond, uncond=None, shared=shared, batch_size=len(prompts))

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The transformer call of `FluxPipeline.__call__`: timestep / 1000 in the latents' dtype; dev's guidance
        (`guidance_scale`, float32) expanded to the batch."""
        batch = latents.shape[0]
        guidance = None
        if self.has_guidance_embedding:
            guidance = torch.full([1], self.guidance_scale, device=latents.device, dtype=torch.float32).expand(batch)
        timestep = timestep.expand(batch).to(latents.dtype)
        return self.denoiser_call(
            hidden_states=latents, timestep=timestep / 1000, guidance=guidance, return_dict=False, **kwargs
        )[0]

    def set_timesteps(self, steps: int, device: torch.device) -> torch.Tensor:
        """The stock pipeline's schedule: sigmas linspace(1, 1/steps), shifted by the scheduler with
        `calculate_shift`'s mu for the packed sequence length (dev; schnell's scheduler does not shift). This is
        also FlowBP's training grid, so flow_sigmas="flowbp" changes nothing here."""
        scheduler = self.scheduler
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        height, width = self.latent_size
        mu = calculate_shift(
            (height // 2) * (width // 2),
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
        return timesteps

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """The unpacked noise shape `FluxPipeline.prepare_latents` draws (so one generator gives its latents)."""
        return (batch_size, self.denoiser.config.in_channels // 4, *self.latent_size)

    def prepare_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """Pack 2x2 patches into tokens (`FluxPipeline._pack_latents`)."""
        batch, channels, height, width = noise.shape
        return self.pipeline._pack_latents(noise, batch, channels, height, width)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """Tokens back to the VAE's latent layout (`FluxPipeline._unpack_latents`)."""
        height, width = self.image_size
        return self.pipeline._unpack_latents(latents, height, width, self.pipeline.vae_scale_factor)
