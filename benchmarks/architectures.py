"""Pipelines to benchmark: the tiny test models, and SD1.5's and SDXL's architectures with random weights.

Step time and memory do not depend on the weights, so `sd15` / `sdxl` build the UNet, VAE and CLIP text
encoder(s) from their published configurations (the `unet/`, `vae/`, `text_encoder*/` config.json files of
stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0) without touching a hub. Only the tokenizer differs:
the tiny model's character-level CLIP vocabulary, which yields valid ids for the 49408-entry embedding table.
`tiny` / `tiny_sdxl` are the tests' random tiny models, loaded through the real loader.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from alignprop import models, tiny
from alignprop.families import family_of
from alignprop.toyworld.components import sampling_scheduler

ARCHITECTURES = ("tiny", "tiny_sdxl", "tiny_sd3", "tiny_flux", "sd15", "sdxl", "sd35", "flux")

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD15_TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


# stable-diffusion-xl-base-1.0: unet/config.json, vae/config.json (SD1.5's VAE layout at 1024 px), and the two
# text encoders (CLIP ViT-L/14's text tower; OpenCLIP ViT-bigG/14's, with a projection: the pooled embedding).
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_TEXT_ENCODER_2 = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


def special_tokens(tokenizer) -> dict:
    eos = tokenizer.eos_token_id
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": eos}


def build_sdxl(device: torch.device, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """SDXL base 1.0's architecture, random weights (seeded), built on `device` and cast to `dtype`."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = tiny.build_tokenizer(Path(directory))
    special = special_tokens(tokenizer)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER, **special))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2, **special))
    return StableDiffusionXLPipeline(
        vae=vae.to(dtype),
        text_encoder=text_encoder.to(dtype),
        text_encoder_2=text_encoder_2.to(dtype),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet.to(dtype),
        scheduler=sampling_scheduler(),  # scaled-linear 0.00085-0.012 over 1000 steps, as SDXL's
        force_zeros_for_empty_prompt=True,
    )


# stable-diffusion-3.5-medium and FLUX.1-dev: transformer/, vae/, text_encoder*/ config.json (T5-XXL v1.1 encoder).
SD35_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLOW_VAE = {
    **SD15_VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
T5_XXL = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
}


def build_flow(arch: str, device: torch.device, dtype: torch.dtype):
    """SD3.5 Medium's or FLUX.1-dev's architecture, random weights (seeded), on `device` in `dtype`."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import T5Config, T5EncoderModel

    from alignprop.tiny_families import t5_tokenizer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = tiny.build_tokenizer(Path(directory))
    t5_tokens, special = t5_tokenizer(), special_tokens(tokenizer)
    t5 = T5Config(vocab_size=32128, tie_word_embeddings=False, is_encoder_decoder=False, **T5_XXL)
    with torch.device(device):
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**SD15_TEXT_ENCODER, **special))
        text_encoder_3 = T5EncoderModel(t5)
        if arch == "sd35":
            denoiser = SD3Transformer2DModel(**SD35_TRANSFORMER)
            clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2, **special))
            vae = AutoencoderKL(**{**FLOW_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609})
        else:
            denoiser = FluxTransformer2DModel(**FLUX_TRANSFORMER)
            vae = AutoencoderKL(**{**FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159})
    cast = lambda module: module.to(dtype)  # noqa: E731
    if arch == "sd35":
        return StableDiffusion3Pipeline(
            transformer=cast(denoiser),
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=cast(vae),
            text_encoder=cast(clip_l),
            tokenizer=tokenizer,
            text_encoder_2=cast(clip_g),
            tokenizer_2=tokenizer,
            text_encoder_3=cast(text_encoder_3),
            tokenizer_3=t5_tokens,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, max_image_seq_len=4096
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=cast(vae),
        text_encoder=cast(CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER, **special)).to(device)),
        tokenizer=tokenizer,
        text_encoder_2=cast(text_encoder_3),
        tokenizer_2=t5_tokens,
        transformer=cast(denoiser),
    )


def build_sd15(device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    """SD1.5's architecture, random weights (seeded), built directly on `device` and cast to `dtype`."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = tiny.build_tokenizer(Path(directory))
    special = special_tokens(tokenizer)
    with torch.device(device):  # random init on the accelerator: seconds instead of a minute on the CPU
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER, **special))
    return StableDiffusionPipeline(
        vae=vae.to(dtype),
        text_encoder=text_encoder.to(dtype),
        tokenizer=tokenizer,
        unet=unet.to(dtype),
        scheduler=sampling_scheduler(),  # SD1.5's scaled-linear DDIM settings
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_pipeline(arch: str, device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    """A frozen, prepared pipeline of architecture `arch` on `device` (weights in `dtype`)."""
    if arch.startswith("tiny"):
        # Through the real loader, like a downloaded checkpoint.
        return models.load_pipeline(arch, dtype=dtype).to(device)
    if arch in ("sd15", "sdxl", "sd35", "flux"):
        builders = {"sd15": build_sd15, "sdxl": build_sdxl}
        pipeline = builders[arch](device, dtype) if arch in builders else build_flow(arch, device, dtype)
        family_of(pipeline).prepare()
        return pipeline
    raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
