"""Flow matching (rectified flow) families, and Stable Diffusion 3 / 3.5.

`FlowMatching` is what SD3 and FLUX share: the model's own `FlowMatchEulerDiscreteScheduler` (its shifted sigmas,
set by the scheduler's `set_timesteps`), the deterministic Euler step x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v,
differentiable in x_i and v, and no DDIM `eta`. `StableDiffusion3` adds SD3's conditioning: CLIP-L, OpenCLIP-G and
T5 through `StableDiffusion3Pipeline.encode_prompt` (the empty prompt as the negative, as the pipeline does), the
pooled CLIP projections, and classifier-free guidance as one batched call over [uncond; cond].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps
from diffusers.utils import convert_unet_state_dict_to_peft

from alignprop.conditioning import Conditioning
from alignprop.errors import UserError
from alignprop.families.base import Family


class FlowMatching(Family):
    """What the flow-matching families share: their own Euler scheduler, no eta, the image size they sample at."""

    load_kwargs = {}
    max_sequence_length = 256  # T5 prompt tokens: the stock pipeline's default (`set_max_sequence_length`)
    sigma_grid = "pipeline"  # `flow_sigmas`: "pipeline" (the stock pipeline's) | "flowbp" (`flowbp_sigmas`)

    @property
    def native_size(self) -> tuple[int, int]:
        """The stock pipeline's default image size (`default_sample_size * vae_scale_factor`, square)."""
        side = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return side, side

    def size_rule(self) -> tuple[int, str]:
        """Sides in multiples of the VAE's downsampling x 2 (16 for SD3 and FLUX): the transformer patches (SD3) /
        packs (FLUX) the latents 2x2."""
        factor = self.pipeline.vae_scale_factor
        return 2 * factor, f"the VAE's factor {factor} x 2 for the transformer's 2x2 patches"

    def prepare(self) -> None:
        """The model's own flow-matching scheduler (kept); frozen eval-mode modules; no progress bars."""
        for name in self.frozen_names:
            module = getattr(self.pipeline, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        self.pipeline.set_progress_bar_config(disable=True)

    def set_max_sequence_length(self, tokens: int) -> None:
        """The T5 prompt length `encode` asks for (both T5 families; the stock pipelines' `max_sequence_length`)."""
        self.max_sequence_length = tokens

    def set_sigma_grid(self, grid: str) -> None:
        self.sigma_grid = grid

    def flowbp_sigmas(self, steps: int):
        """FlowBP's training-rollout grid, linspace(1, 1/N, N) before the scheduler's shift
        (`RuoyuWang-2077/FlowBP` @ 93b220a `flowbp/trainers/sd35/leapalign.py:100-126`); None: the pipeline's."""
        return np.linspace(1.0, 1 / steps, steps) if self.sigma_grid == "flowbp" else None

    def check_options(self, options) -> None:
        """Refuse sampling options that have no meaning for a flow-matching model (one line each)."""
        if options.eta != 0:
            raise UserError(self._eta_message(options.eta))

    def _eta_message(self, eta) -> str:
        return (
            f"eta={eta} is DDIM's noise level; {self.name} samples with the deterministic flow-matching Euler step, "
            "which has none: set --config.eta=0"
        )

    def guided(self, options) -> bool:
        self.check_options(options)
        return super().guided(options)

    def save_lora(self, directory: Path, layers: dict, metadata: dict) -> None:
        """The transformer pipelines' layout: peft's key names (`<module>.lora_A.weight`), as diffusers' SD3 / FLUX
        DreamBooth-LoRA scripts save them (its `.lora.down` conversion knows only to_q/k/v/out, not the
        context projections)."""
        super().save_lora(directory, convert_unet_state_dict_to_peft(layers), metadata)

    def prepare_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """Flow matching starts from the unscaled Gaussian (sigma_max = 1), as the stock pipelines do."""
        return noise

    def step(self, output, timestep, latents, eta: float = 0.0, generator: torch.Generator | None = None):
        """The flow-matching Euler step of `FlowMatchEulerDiscreteScheduler.step` (equal to it in float32), on the
        scheduler's own sigmas, without its internal step counter and without its float32 round trip (so that
        float64 stays float64): x + (sigma_next - sigma) * v, differentiable in x and v."""
        if eta != 0:
            raise UserError(self._eta_message(eta))
        index = self.scheduler.index_for_timestep(timestep)
        sigmas = self.scheduler.sigmas
        return latents + (sigmas[index + 1] - sigmas[index]) * output

    # --- gradient paths (alignprop.paths): x_sigma = sigma * noise + (1 - sigma) * x0, v = noise - x0 ---

    def _sigma(self, timestep, after_step: bool = False) -> torch.Tensor:
        return self.scheduler.sigmas[self.scheduler.index_for_timestep(timestep) + int(after_step)]

    def denoised(self, output, timestep, latents):
        return latents - self._sigma(timestep).to(latents.dtype) * output

    def noise_level(self, timestep) -> float:
        return float(self._sigma(timestep))

    def add_noise(self, clean, noise, timestep):
        sigma = self._sigma(timestep).to(clean.dtype)
        return sigma * noise + (1 - sigma) * clean

    def clean_after_step(self, latents, noise, timestep):
        sigma = self._sigma(timestep, after_step=True).to(latents.dtype)
        return (latents - sigma * noise) / (1 - sigma)

    def clean_at(self, latents, noise, timestep):
        sigma = self._sigma(timestep).to(latents.dtype)
        return (latents - sigma * noise) / (1 - sigma)

    def implied_noise(self, clean, timestep, latents):
        sigma = self._sigma(timestep).to(latents.dtype)
        return (latents - (1 - sigma) * clean) / sigma


class StableDiffusion3(FlowMatching):
    """SD3 / SD3.5: MMDiT transformer on 16-channel latents; CLIP-L + OpenCLIP-G + T5 prompts; CFG."""

    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    denoiser_name = "transformer"
    frozen_names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def size_rule(self) -> tuple[int, str]:
        """`StableDiffusion3Pipeline.check_inputs`: sides in multiples of the VAE's factor x the patch size."""
        factor, patch = self.pipeline.vae_scale_factor, self.denoiser.config.patch_size
        return factor * patch, f"the VAE's factor {factor} x the transformer's patch size {patch}"

    def largest_side(self) -> int | None:
        """The transformer's positional embedding covers `pos_embed_max_size` patches a side (SD3 / SD3.5: 192,
        3072 px); None: it has no limit."""
        patches = self.denoiser.config.get("pos_embed_max_size")
        return patches * self.denoiser.config.patch_size * self.pipeline.vae_scale_factor if patches else None

    @torch.no_grad()
    def encode(self, prompts: list[str], guided: bool = True) -> Conditioning:
        """`StableDiffusion3Pipeline.encode_prompt` (T5 to `max_sequence_length` tokens; negatives: "")."""
        pipeline = self.pipeline
        device = pipeline.text_encoder.device
        cond, uncond, pooled, uncond_pooled = pipeline.encode_prompt(
            prompts,
            None,
            None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            max_sequence_length=self.max_sequence_length,
        )

        def wrap(embeds, pooled_embeds):
            return None if embeds is None else {"encoder_hidden_states": embeds, "pooled_projections": pooled_embeds}

        return Conditioning(
            cond=wrap(cond, pooled), uncond=wrap(uncond, uncond_pooled) if guided else None, batch_size=len(prompts)
        )

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The transformer call of `StableDiffusion3Pipeline.__call__`: the timestep expanded to the batch."""
        return self.denoiser_call(
            hidden_states=latents, timestep=timestep.expand(latents.shape[0]), return_dict=False, **kwargs
        )[0]

    def set_timesteps(self, steps: int, device: torch.device) -> torch.Tensor:
        """The stock pipeline's schedule: the scheduler's shifted sigmas, with `calculate_shift`'s mu when the
        scheduler shifts dynamically (it does not for the released SD3 / SD3.5 configs); with flow_sigmas="flowbp"
        the shift is applied to FlowBP's linspace(1, 1/N, N) instead (last sigma 0.111 at 25 steps and shift 3,
        the pipeline's 0.0089)."""
        scheduler, kwargs = self.scheduler, {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = self.denoiser.config.patch_size
            height, width = self.latent_size
            kwargs["mu"] = calculate_shift(
                (height // patch) * (width // patch),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=self.flowbp_sigmas(steps), **kwargs)
        return timesteps

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """`StableDiffusion3Pipeline.prepare_latents`' shape at the model's image size."""
        return (batch_size, self.denoiser.config.in_channels, *self.latent_size)
