"""Aesthetic reward: the LAION aesthetic predictor v1 on CLIP ViT-L/14 image embeddings.

The head "sac+logos+ava1-l14-linearMSE" (github.com/christophschuhmann/improved-aesthetic-predictor) is
a stack of linear layers, 768 -> 1024 -> 128 -> 64 -> 16 -> 1, with dropout between (and no other
non-linearity), applied to the L2-normalised CLIP image embedding. It regresses the mean human rating on a
1-10 scale (SAC, LAION-Logos and AVA ratings); LAION-Aesthetics used 5, 6 and 6.5 as "good" thresholds.

Weights (config.rewards.aesthetic):
  clip_model     hub id or local directory of a CLIP vision tower (default openai/clip-vit-large-patch14);
  processor      where its preprocessor_config.json lives (empty: clip_model);
  head_path      a head file (.pth state dict with keys layers.0.weight, ..., or .safetensors); empty: the
                 copy the original AlignProp repository shipped, in assets/aesthetic/ (no download);
  head_repo, head_filename   when head_path is empty and head_repo is set, the head is fetched from that
                 hub repo instead, e.g. trl-lib/ddpo-aesthetic-predictor, aesthetic-model.pth (the same
                 LAION head as published for TRL's DDPO example).

Loss, as in the original: |r - aesthetic_target| x grad_scale, or -r x grad_scale when the target is None.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionModelWithProjection

from alignprop import shipped
from alignprop.rewards.base import Reward, RewardResult
from alignprop.rewards.hf_clip import load_image_spec, load_pretrained, unit
from alignprop.rewards.loading import load_weights_into, resolve_file
from alignprop.rewards.preprocess import ImageSpec, prepare
from alignprop.rewards.registry import RewardSettings, register

OPTIONS = "config.rewards.aesthetic"
# The LAION head as the original AlignProp repository shipped it (assets/README.md has its sha256).
SHIPPED_HEAD = shipped.ASSETS / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"


class AestheticHead(nn.Module):
    """The LAION predictor's layers; attribute names match its state dict (layers.0.weight, ...)."""

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


class Aesthetic(Reward):
    def __init__(
        self,
        vision: CLIPVisionModelWithProjection,
        head: AestheticHead,
        spec: ImageSpec,
        target: float | None,
        grad_scale: float,
    ):
        super().__init__()
        self.vision = vision  # inference dtype
        self.head = head  # float32: tiny, and it reads the float32 unit embedding
        self.spec = spec
        self.target = target
        self.grad_scale = grad_scale

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pixels = prepare(images, self.spec).to(self.vision.dtype)
        return unit(self.vision(pixel_values=pixels).image_embeds)

    def score(self, images, prompts):
        reward = self.head(self.embed(images))
        loss = -reward if self.target is None else (reward - self.target).abs()
        return RewardResult(loss=loss * self.grad_scale, reward=reward.detach())


def head_file(options) -> Path:
    """head_path if set, else the hub file when head_repo is set, else the shipped copy."""
    if not options.head_path and not options.head_repo:
        return SHIPPED_HEAD
    return resolve_file(options.head_path, options.head_repo, options.head_filename, f"{OPTIONS}.head_path")


@register("aesthetic", section="aesthetic")
def load_aesthetic(settings: RewardSettings) -> Aesthetic:
    options = settings.options
    head_path = head_file(options)  # the small file first, so that a missing one fails before the CLIP download
    vision = load_pretrained(CLIPVisionModelWithProjection, options.clip_model, f"{OPTIONS}.clip_model", settings.dtype)
    spec = load_image_spec(options.processor or options.clip_model, f"{OPTIONS}.processor")
    head = AestheticHead(vision.config.projection_dim)
    load_weights_into(head, head_path, "LAION aesthetic head", f"{OPTIONS}.head_path")
    spec = replace(spec, mode=settings.preprocess)
    return Aesthetic(vision, head, spec, settings.aesthetic_target, settings.grad_scale)
