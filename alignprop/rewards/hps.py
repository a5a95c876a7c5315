"""HPSv2 reward (Human Preference Score v2, Wu et al. 2023) on open_clip, without the hpsv2 package.

HPSv2 is an open_clip ViT-H-14 fine-tuned on human preference pairs (HPD v2). The score is the cosine
between the normalised image and prompt features: around 0.2-0.35 for typical images (papers report it
x100, e.g. ~27 for Stable Diffusion 1.5 on the HPSv2 benchmark). loss = 1 - score, as in AlignProp.

Weights (config.rewards.hps):
  version     "v2.0" (HPS_v2_compressed.pt, the one AlignProp used) or "v2.1" (HPS_v2.1_compressed.pt);
  checkpoint  a local copy of that file; empty: fetched from the hub repo `repo` (default xswu/HPSv2);
  model_name  the open_clip architecture (ViT-H-14), created without pretrained weights.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import open_clip
import torch

from alignprop.errors import UserError
from alignprop.rewards.base import Reward, RewardResult
from alignprop.rewards.hf_clip import unit
from alignprop.rewards.loading import load_weights_into, resolve_file
from alignprop.rewards.preprocess import ImageSpec, prepare
from alignprop.rewards.registry import RewardSettings, register

OPTIONS = "config.rewards.hps"
CHECKPOINT_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
# open_clip's own mixed precision: matmul weights in low precision, layer norms in float32.
OPEN_CLIP_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def checkpoint_filename(version: str) -> str:
    if version not in CHECKPOINT_FILES:
        raise UserError(f"{OPTIONS}.version={version!r} is unknown; choose one of {', '.join(CHECKPOINT_FILES)}")
    return CHECKPOINT_FILES[version]


def create_open_clip(model_name: str, dtype: torch.dtype) -> torch.nn.Module:
    """The bare architecture, randomly initialised: the HPSv2 checkpoint replaces every weight."""
    if open_clip.get_model_config(model_name) is None:
        raise UserError(f"{OPTIONS}.model_name={model_name!r} is not an open_clip architecture")
    # open_clip warns "Model initialized randomly", which is true only until the checkpoint loads.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(model_name, pretrained=None, precision=OPEN_CLIP_PRECISION[dtype])
    finally:
        logging.disable(previous)


def image_spec(model: torch.nn.Module) -> ImageSpec:
    """open_clip's evaluation transform: resize shortest side, centre crop (what HPSv2 scored with)."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if cfg.get("resize_mode", "shortest") != "shortest" or cfg.get("interpolation", "bicubic") != "bicubic":
        raise UserError(f"{OPTIONS}.model_name: only bicubic shortest-side resizing is supported")
    return ImageSpec(
        resize=min(height, width),
        crop=(height, width),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        crop_offset="round",  # torchvision's CenterCrop
    )


class HPS(Reward):
    def __init__(self, model: torch.nn.Module, tokenizer, spec: ImageSpec):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = prepare(images, self.spec).to(self.model.visual.conv1.weight.dtype)
        return unit(self.model.encode_image(pixels))

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.model.logit_scale.device)
        return unit(self.model.encode_text(tokens))

    def score(self, images, prompts):
        reward = (self.image_features(images) * self.text_features(prompts)).sum(dim=-1)
        return RewardResult(loss=1 - reward, reward=reward.detach())


@register("hps", section="hps")
def load_hps(settings: RewardSettings) -> HPS:
    options = settings.options
    filename = checkpoint_filename(options.version)
    # Find the file before building the ~1B-parameter model, so a missing file fails fast.
    path = resolve_file(options.checkpoint, options.repo, filename, f"{OPTIONS}.checkpoint")
    model = create_open_clip(options.model_name, settings.dtype)
    load_weights_into(model, path, f"HPSv2 {options.model_name}", f"{OPTIONS}.checkpoint")
    spec = replace(image_spec(model), mode=settings.preprocess)
    return HPS(model, open_clip.get_tokenizer(options.model_name), spec)
