"""The toy world's Stable Diffusion components: the real diffusers/transformers classes, small configs.

Shapes: 32x32 RGB images <-> 8x8x4 latents (the VAE downsamples by 4); a 2-layer CLIP text encoder of
width 64 over the hand-built vocabulary; a cross-attention UNet at 8x8. The schedule is Stable Diffusion
1.5's (scaled-linear betas, epsilon prediction), so the DDIM sampler treats it exactly like SD.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from alignprop.toyworld.vocab import MAX_LENGTH, write_tokenizer_files
from alignprop.toyworld.world import IMAGE_SIZE

LATENT_SIZE = IMAGE_SIZE // 4
TEXT_WIDTH = 64
# GroupNorm groups: 4-8 channels per group. One channel per group (SD's 32 groups at these widths) would
# normalise away each channel's mean over the image, which is where a flat background's colour lives.
NORM_GROUPS = 8
# Stable Diffusion 1.5's noise schedule.
SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def build_vae(widths=(32, 64, 64), groups: int = NORM_GROUPS, image_size: int = IMAGE_SIZE) -> AutoencoderKL:
    """A Stable Diffusion VAE (4 latent channels) that downsamples by 2 ** (len(widths) - 1)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=tuple(widths),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=image_size,
    )


def build_tokenizer(directory: Path) -> CLIPTokenizer:
    """Write the vocabulary files into `directory` and load them the way a user's checkpoint is loaded."""
    write_tokenizer_files(directory)
    return CLIPTokenizer.from_pretrained(directory, model_max_length=MAX_LENGTH)


def build_text_encoder(tokenizer: CLIPTokenizer, projection: bool = False):
    """A 2-layer CLIP text tower of width TEXT_WIDTH over the toy vocabulary; `projection`: with the projected pooled
    output (CLIPTextModelWithProjection, SD3's text-encoder slots)."""
    extra = {"projection_dim": TEXT_WIDTH} if projection else {}
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def build_unet(
    widths=(32, 64, 64), text_width: int = TEXT_WIDTH, groups: int = NORM_GROUPS, sample_size: int = LATENT_SIZE
) -> UNet2DConditionModel:
    """A Stable Diffusion UNet: cross-attention at every resolution but the lowest, as in SD 1.5."""
    cross_attention = len(widths) - 1
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(widths),
        down_block_types=("CrossAttnDownBlock2D",) * cross_attention + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * cross_attention,
        cross_attention_dim=text_width,
        attention_head_dim=8,
        norm_num_groups=groups,
    )


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE, prediction_type="epsilon", clip_sample=False)


def sampling_scheduler() -> DDIMScheduler:
    """What the shipped pipeline carries: DDIM with SD 1.5's settings over the training schedule."""
    return DDIMScheduler(
        **SCHEDULE, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )


def assemble(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
