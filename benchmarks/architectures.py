"""Pipelines to benchmark: the tiny test model, and Stable Diffusion 1.5's architecture with random weights.

Step time and memory do not depend on the weights, so `sd15` builds the SD1.5 UNet, VAE and CLIP text
encoder from their published configurations (the `unet/`, `vae/` and `text_encoder/` config.json files of
stable-diffusion-v1-5) without touching a hub. Only the tokenizer differs: the tiny model's
character-level CLIP vocabulary, which yields valid ids for the 49408-entry embedding table.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from alignprop import models, tiny
from alignprop.families import Family
from alignprop.toyworld.components import sampling_scheduler

ARCHITECTURES = ("tiny", "sd15")

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


def build_sd15(device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    """SD1.5's architecture, random weights (seeded), built directly on `device` and cast to `dtype`."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = tiny.build_tokenizer(Path(directory))
    eos = tokenizer.eos_token_id
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": eos}
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
    if arch == "tiny":
        # Through the real loader, like a downloaded checkpoint.
        return models.load_pipeline("tiny", dtype=dtype).to(device)
    if arch == "sd15":
        pipeline = build_sd15(device, dtype)
        Family(pipeline).prepare()
        return pipeline
    raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
