"""The family interface, implemented for Stable Diffusion 1.x / 2.x (UNet, DDIM, one CLIP text encoder).

Other families (`alignprop.families.sdxl`, ...) subclass `Family` and override what differs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from alignprop.cache import cache_root
from alignprop.conditioning import Conditioning
from alignprop.errors import UserError, excerpt


class Family:
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, DDIM (epsilon or v-prediction)."""

    name = "sd"
    pipeline_class = StableDiffusionPipeline
    denoiser_name = "unet"  # the pipeline attribute that holds the denoiser (and the LoRA file's key prefix)
    frozen_names = ("vae", "text_encoder", "unet")
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}  # no NSFW filter while training

    text_encoder_names = ("text_encoder",)
    # The image size sampled at, (height, width) in pixels; None: the model's own (`native_size`). `set_resolution`.
    resolution: tuple[int, int] | None = None

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.prompt_cache: dict[str, Conditioning] | None = None  # set by `offload_text_encoders`
        self.compiled_denoiser: torch.nn.Module | None = None  # set by `compile_denoiser`

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def denoiser_call(self) -> torch.nn.Module:
        """What runs a denoiser call: the compiled denoiser for a call without autograd (`compile_denoiser`),
        else the denoiser itself (calls that keep their gradient are never compiled)."""
        if self.compiled_denoiser is not None and not torch.is_grad_enabled():
            return self.compiled_denoiser
        return self.denoiser

    def compile_denoiser(self, mode: str) -> None:
        """`torch.compile` the denoiser for the calls without gradient (the no-grad prefix, the detached steps,
        evaluation). Lazy: it compiles on the first such call, so a LoRA added afterwards is part of the graph.
        The LoRA weights are graph inputs, read at every call, so optimizer updates in place need no recompile
        (with mode="reduce-overhead" on CUDA, the captured graphs read them from their fixed addresses)."""
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
        self.compiled_denoiser = torch.compile(self.denoiser, mode=None if mode == "default" else mode)

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
        return self.denoiser_call(latents, timestep, **kwargs).sample

    def conditioning(self, prompts: list[str], guided: bool = True) -> Conditioning:
        """`encode`, or the cached encodings once the text encoders are offloaded."""
        if self.prompt_cache is None:
            return self.encode(prompts, guided)
        missing = [prompt for prompt in prompts if prompt not in self.prompt_cache]
        if missing:
            raise UserError(f"prompt {excerpt(missing[0])} was not encoded before the text encoders were offloaded")
        return Conditioning.join([self.prompt_cache[prompt] for prompt in prompts], guided)

    def offload_text_encoders(self, prompts: list[str], batch_size: int = 16) -> None:
        """Encode every prompt once (with its unconditional partner), then move the text encoders to the CPU:
        their memory (T5-XXL: 4.7B parameters) is freed on the accelerator for the whole run."""
        unique = list(dict.fromkeys(prompts))
        cache = {}
        for start in range(0, len(unique), batch_size):
            chunk = unique[start : start + batch_size]
            cache.update(zip(chunk, self.encode(chunk, guided=True).samples()))
        for name in self.text_encoder_names:
            module = getattr(self.pipeline, name, None)
            if module is not None:
                module.to("cpu")
        self.prompt_cache = cache

    def check_options(self, options) -> None:
        """Refuse sampling options the family cannot honour (one line, before the run directory exists)."""

    # --- the image size (config key `resolution`) ----------------------------------------------------

    @property
    def native_size(self) -> tuple[int, int]:
        """The stock pipeline's default (height, width): the UNet's sample size x the VAE's downsampling."""
        size = self.denoiser.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        factor = self.pipeline.vae_scale_factor
        return height * factor, width * factor

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images sampled: `resolution`, else the model's own."""
        return self.resolution or self.native_size

    @property
    def latent_size(self) -> tuple[int, int]:
        """(height, width) of the VAE latents, as the stock pipelines compute them from the image size."""
        factor = self.pipeline.vae_scale_factor
        return tuple(int(side) // factor for side in self.image_size)

    def size_rule(self) -> tuple[int, str]:
        """What every image side must be a multiple of, and why: 8, what the stock SD / SDXL pipelines require
        (`check_inputs`), and the VAE's downsampling (whole latents)."""
        factor = self.pipeline.vae_scale_factor
        return math.lcm(8, factor), f"the stock pipeline requires multiples of 8; the VAE downsamples by {factor}"

    def largest_side(self) -> int | None:
        """The largest image side the denoiser takes (None: no limit)."""
        return None

    def set_resolution(self, resolution) -> None:
        """Config key `resolution`: sample (train and evaluate) at this size. None: the model's own; a number:
        a square side in pixels; (height, width): a rectangle. A size the family cannot take is one line.
        Call it before prompts are encoded (SDXL's size ids and FLUX's image ids are part of the encoding)."""
        if resolution is None:
            self.resolution = None
            return
        given = tuple(resolution) if isinstance(resolution, tuple | list) else (resolution, resolution)
        shown = f"resolution={resolution!r}"
        if len(given) != 2 or not all(isinstance(side, int) and not isinstance(side, bool) for side in given):
            raise UserError(f"{shown} must be a side in pixels or a (height, width) pair of them")
        multiple, why = self.size_rule()
        largest = self.largest_side()
        height, width = given
        if min(given) < multiple or any(side % multiple for side in given) or (largest and max(given) > largest):
            limit = f" and at most {largest}" if largest else ""
            nearest = [min(max(multiple, side // multiple * multiple), largest or side) for side in given]
            hint = nearest[0] if nearest[0] == nearest[1] else f'"({nearest[0]},{nearest[1]})"'
            raise UserError(
                f"{shown}: this {self.name} model needs height and width that are multiples of {multiple} ({why})"
                f"{limit}, got {height} x {width}; e.g. --config.resolution={hint}"
            )
        self.resolution = (height, width)

    def set_max_sequence_length(self, tokens: int) -> None:
        """`pretrained.max_sequence_length`: the T5 prompt length of the families that have T5 (SD3, FLUX)."""
        raise UserError(
            f"pretrained.max_sequence_length={tokens} is the T5 prompt length of SD3 / FLUX models; this is a "
            f"{self.name} model without T5: leave it at 0"
        )

    def set_sigma_grid(self, grid: str) -> None:
        """`flow_sigmas`: the flow-matching sigma grid; DDIM families have only their own schedule."""
        if grid != "pipeline":
            raise UserError(
                f"flow_sigmas={grid!r} chooses a flow-matching sigma grid; this {self.name} model samples with DDIM "
                "on its own schedule: leave flow_sigmas='pipeline'"
            )

    def guided(self, options) -> bool:
        """Whether sampling runs classifier-free guidance (one batched call over [uncond; cond]). At guidance 1,
        uncond + 1 * (cond - uncond) = cond: the unconditional half is skipped (as diffusers does)."""
        return options.guidance_scale != 1.0

    def set_timesteps(self, steps: int, device: torch.device) -> torch.Tensor:
        self.scheduler.set_timesteps(steps, device=device)
        return self.scheduler.timesteps

    def step(self, output, timestep, latents, eta: float = 0.0, generator: torch.Generator | None = None):
        return self.scheduler.step(output, timestep, latents, eta=eta, generator=generator).prev_sample

    # --- gradient paths (alignprop.paths): the noise schedule in closed form ----------------------

    def denoised(self, output, timestep, latents):
        """The clean latents that the denoiser's `output` at `timestep` predicts (DDIM's pred_original_sample)."""
        return self.scheduler.step(output, timestep, latents, eta=0.0).pred_original_sample

    def _alpha_bar(self, timestep) -> torch.Tensor:
        return self.scheduler.alphas_cumprod[int(timestep)]

    def _alpha_bar_after_step(self, timestep) -> torch.Tensor:
        """alpha_bar of the level that DDIM's step from `timestep` lands on (as `DDIMScheduler.step` computes it)."""
        scheduler = self.scheduler
        previous = int(timestep) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        return scheduler.alphas_cumprod[previous] if previous >= 0 else scheduler.final_alpha_cumprod

    def noise_level(self, timestep) -> float:
        """The noise level of `timestep` in (0, 1) on the flow-matching scale: sigma with the same signal-to-noise
        ratio, sqrt(1 - a) / (sqrt(a) + sqrt(1 - a)) for alpha_bar a (a flow family's sigma itself)."""
        alpha_bar = float(self._alpha_bar(timestep))
        return (1 - alpha_bar) ** 0.5 / (alpha_bar**0.5 + (1 - alpha_bar) ** 0.5)

    def add_noise(self, clean, noise, timestep):
        """The forward process at `timestep`: sqrt(a) x0 + sqrt(1 - a) noise."""
        alpha_bar = self._alpha_bar(timestep).to(clean.dtype)
        return alpha_bar**0.5 * clean + (1 - alpha_bar) ** 0.5 * noise

    def clean_after_step(self, latents, noise, timestep):
        """The clean latents that `latents`, at the level the step from `timestep` lands on, hold with the known
        `noise`: (x - sqrt(1 - a') noise) / sqrt(a'), the forward process solved for x0 (Direct-Align)."""
        alpha_bar = self._alpha_bar_after_step(timestep).to(latents.dtype)
        return (latents - (1 - alpha_bar) ** 0.5 * noise) / alpha_bar**0.5

    def clean_at(self, latents, noise, timestep):
        """The clean latents that `latents`, at `timestep`'s level, hold with the known `noise` (Direct-Align's
        inversion branch)."""
        alpha_bar = self._alpha_bar(timestep).to(latents.dtype)
        return (latents - (1 - alpha_bar) ** 0.5 * noise) / alpha_bar**0.5

    def implied_noise(self, clean, timestep, latents):
        """The noise that `latents` at `timestep`'s level hold if `clean` is their clean part (DDIM's epsilon)."""
        alpha_bar = self._alpha_bar(timestep).to(latents.dtype)
        return (latents - alpha_bar**0.5 * clean) / (1 - alpha_bar) ** 0.5

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """The shape of the Gaussian noise that starts sampling (as the stock pipeline draws it)."""
        return (batch_size, self.denoiser.config.in_channels, *self.latent_size)

    def prepare_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """Noise -> the sampler's starting latents (scaled; a family that packs latents packs them here)."""
        return noise * self.scheduler.init_noise_sigma

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """The sampler's final latents -> the VAE's latent layout."""
        return latents

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
