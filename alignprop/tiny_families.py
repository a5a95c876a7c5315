"""Tiny, deterministic, random-weight pipelines of the larger model families, for tests (like `alignprop.tiny`).

One per family: SDXL, SD2.x v-prediction, SD3 (and SD3.5's attention variants), FLUX.1 dev and schnell. Each
is the stock diffusers pipeline class over the real diffusers/transformers components, built from small
configs with a fixed seed, saved with `save_pretrained` into a versioned cache directory and then loaded
with the stock `from_pretrained`, exactly like a downloaded checkpoint. Every family makes 32x32 RGB
images from 8x8 latents (the VAE downsamples by 4). Tokenizers are built offline: the tiny model's
character-level CLIP vocabulary and a character-level T5 (Unigram) vocabulary; no hub is touched.

Settings that are not about size (scheduler, VAE scaling, pad tokens, activations, which encoder has a
projection) follow the published checkpoints' configs: stable-diffusion-xl-base-1.0, stable-diffusion-2-1,
stable-diffusion-3-medium / 3.5, FLUX.1-dev / FLUX.1-schnell.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from alignprop.tiny import SEED, cached_pipeline_dir, tiny_text_settings, write_tokenizer_files
from alignprop.toyworld.components import SCHEDULE
from alignprop.toyworld.vocab import t5_tokenizer

LATENT_SIZE = 8
IMAGE_SIZE = LATENT_SIZE * 4
CLIP_LENGTH = 77
VERSIONS = {
    "sdxl": "tiny-sdxl-v1",
    "sd2v": "tiny-sd2v-v1",
    "sd3": "tiny-sd3-v1",
    "sd35": "tiny-sd35-v1",
    "flux": "tiny-flux-dev-v1",
    "flux_schnell": "tiny-flux-schnell-v1",
}


# stable-diffusion-xl-base-1.0's scheduler_config.json. The keys Euler ignores (clip_sample, set_alpha_to_one,
# ...) are kept in its config, as from the hub, so a DDIM built from that config gets SDXL's settings.
SDXL_SCHEDULER = {
    **SCHEDULE,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "sample_max_value": 1.0,
    "skip_prk_steps": True,
}


# --- shared components -----------------------------------------------------------------------------------


def clip_tokenizer(directory: Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The tiny model's character-level CLIP tokenizer. OpenCLIP-trained towers (SD2, SDXL's and SD3's
    second encoder) ship with pad token "!" instead of "<|endoftext|>"."""
    write_tokenizer_files(directory)
    return CLIPTokenizer.from_pretrained(directory, model_max_length=CLIP_LENGTH, pad_token=pad_token)


def clip_encoder(tokenizer: CLIPTokenizer, width: int = 32, projection: int | None = None, act: str = "quick_gelu"):
    """A 2-layer CLIP text tower; `projection` makes it a CLIPTextModelWithProjection (pooled `text_embeds`).

    OpenAI CLIP-L uses quick_gelu, the OpenCLIP towers gelu.
    """
    settings = tiny_text_settings(len(tokenizer)) | {"hidden_size": width, "intermediate_size": 2 * width}
    config = CLIPTextConfig(**settings, hidden_act=act, projection_dim=projection or width)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def t5_encoder(tokenizer: T5Tokenizer, width: int) -> T5EncoderModel:
    """A 2-layer T5 v1.1 encoder (gated-gelu, untied), as the T5-XXL of SD3 and FLUX."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def vae(latent_channels: int = 4, **config) -> AutoencoderKL:
    """The tiny model's VAE layout (`components.build_vae` at widths 16, 32, 32) with a family's latent
    channels and scaling/shift factors. (components.build_vae fixes 4 latent channels and SD1.5's scaling.)"""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        **config,
    )


# --- the families ----------------------------------------------------------------------------------------


def build_tiny_sdxl(directory: Path) -> StableDiffusionXLPipeline:
    """SDXL: CLIP-L (hidden states) + OpenCLIP-G with projection (hidden states and pooled `text_embeds`),
    concatenated to 64 wide; the UNet adds the pooled embedding and 6 size/crop ids ("text_time")."""
    torch.manual_seed(SEED)
    tokenizer = clip_tokenizer(directory / "tokenizer")
    tokenizer_2 = clip_tokenizer(directory / "tokenizer_2", pad_token="!")
    text_encoder = clip_encoder(tokenizer, width=32)
    text_encoder_2 = clip_encoder(tokenizer_2, width=32, projection=32, act="gelu")
    time_embed = 8  # per time id; SDXL: 256 (6 ids + 1280 pooled = 2816)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # SDXL: no attention at full resolution
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),  # diffusers' name for SDXL's head counts (5, 10, 20)
        use_linear_projection=True,
        cross_attention_dim=32 + 32,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=32 + 6 * time_embed,
        norm_num_groups=16,
    )
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    return StableDiffusionXLPipeline(
        vae=vae(scaling_factor=0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_tiny_sd2v(directory: Path) -> StableDiffusionPipeline:
    """SD2.1 (768, v-prediction): OpenCLIP-H text tower (gelu, pad "!"), linear-projection attention with
    per-level head counts and upcast attention, DDIM with v-prediction."""
    torch.manual_seed(SEED)
    tokenizer = clip_tokenizer(directory / "tokenizer", pad_token="!")
    text_encoder = clip_encoder(tokenizer, width=32, act="gelu")
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),  # SD2: (5, 10, 20, 20)
        use_linear_projection=True,
        upcast_attention=True,
        cross_attention_dim=32,
        norm_num_groups=16,
    )
    # stable-diffusion-2-1's scheduler_config.json: DDIM, v-prediction, leading spacing, no zero-SNR rescale.
    scheduler = DDIMScheduler(
        **SCHEDULE, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd3(directory: Path, sd35: bool = False) -> StableDiffusion3Pipeline:
    """SD3: CLIP-L (32) and OpenCLIP-G (64), both with projection, and T5 (128). The pipeline concatenates
    the CLIP hidden states (96), zero-pads them to T5's width and stacks them with T5's on the token axis,
    so joint_attention_dim = 128; the pooled embedding is both projections, 32 + 64 = 96.

    `sd35` adds SD3.5's attention variants: RMS q/k norm (3.5 large, medium) and a dual-attention block
    (3.5 medium).
    """
    torch.manual_seed(SEED)
    tokenizer = clip_tokenizer(directory / "tokenizer")
    tokenizer_2 = clip_tokenizer(directory / "tokenizer_2", pad_token="!")
    tokenizer_3 = t5_tokenizer()
    text_encoder = clip_encoder(tokenizer, width=32, projection=32)
    text_encoder_2 = clip_encoder(tokenizer_2, width=64, projection=64, act="gelu")
    text_encoder_3 = t5_encoder(tokenizer_3, width=128)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=128,
        caption_projection_dim=32,
        pooled_projection_dim=32 + 64,
        pos_embed_max_size=16,  # in patches: latents up to 32x32
        qk_norm="rms_norm" if sd35 else None,
        dual_attention_layers=(0,) if sd35 else (),
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def build_tiny_flux(directory: Path, schnell: bool = False) -> FluxPipeline:
    """FLUX.1: CLIP-L's pooled output (32) and T5's hidden states (32) condition a 1 double + 1 single block
    transformer over 2x2-packed 16-channel latents (64 = 16 * 4 input channels). dev embeds the guidance
    scale and shifts the schedule with the image size; schnell does neither."""
    torch.manual_seed(SEED)
    tokenizer = clip_tokenizer(directory / "tokenizer")
    tokenizer_2 = t5_tokenizer()
    text_encoder = clip_encoder(tokenizer, width=32)
    text_encoder_2 = t5_encoder(tokenizer_2, width=32)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=not schnell,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim; FLUX: (16, 56, 56)
    )
    if schnell:  # FLUX.1-schnell's scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    else:  # FLUX.1-dev's
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


# --- cached directories ----------------------------------------------------------------------------------


def tiny_sdxl_pipeline_dir(root: Path | None = None) -> Path:
    return cached_pipeline_dir(VERSIONS["sdxl"], build_tiny_sdxl, root)


def tiny_sd2v_pipeline_dir(root: Path | None = None) -> Path:
    return cached_pipeline_dir(VERSIONS["sd2v"], build_tiny_sd2v, root)


def tiny_sd3_pipeline_dir(root: Path | None = None, sd35: bool = False) -> Path:
    return cached_pipeline_dir(VERSIONS["sd35" if sd35 else "sd3"], partial(build_tiny_sd3, sd35=sd35), root)


def tiny_flux_pipeline_dir(root: Path | None = None, schnell: bool = False) -> Path:
    name = VERSIONS["flux_schnell" if schnell else "flux"]
    return cached_pipeline_dir(name, partial(build_tiny_flux, schnell=schnell), root)


# Short name -> directory builder (root=None: the cache).
TINY_FAMILIES = {
    "tiny_sdxl": tiny_sdxl_pipeline_dir,
    "tiny_sd2v": tiny_sd2v_pipeline_dir,
    "tiny_sd3": tiny_sd3_pipeline_dir,
    "tiny_sd35": partial(tiny_sd3_pipeline_dir, sd35=True),
    "tiny_flux": tiny_flux_pipeline_dir,
    "tiny_flux_schnell": partial(tiny_flux_pipeline_dir, schnell=True),
}
