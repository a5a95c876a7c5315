"""ImageReward v1.0 reward (Xu et al. 2023, arXiv 2304.05977) on transformers' BLIP modules, without the
image-reward package.

ImageReward is BLIP (a ViT-L/16 image encoder and a BERT text encoder whose layers cross-attend to the image)
fine-tuned on human preference rankings (ImageRewardDB): the prompt is encoded with the image as cross-attention
context, the [CLS] feature goes through a 5-layer linear head, and the output is standardised with the mean and
std the authors published (higher is better, unbounded; ImageReward's ReFL trains on relu(2 - score)). loss = -score.

Reference: THUDM/ImageReward @ c1392c6 (cited below as IR), ImageReward/ImageReward.py and ImageReward/models/BLIP.
Images go through ImageReward's own transform whatever `rewards.preprocess` says: shortest side to 224 (bicubic),
centre crop, CLIP mean/std (IR ImageReward.py lines 30-37); prompts through bert-base-uncased with [DEC] and [ENC]
added, padded to 35 tokens (IR blip.py lines 16-21, ImageReward.py line 110).

Weights (config.rewards.imagereward):
  checkpoint  local ImageReward.pt (a torch state dict of plain tensors); empty: fetched from hub repo `repo`;
  med_config  local med_config.json (the BERT text encoder's configuration); empty: fetched from `repo`;
  tokenizer   hub id or local directory of the BERT tokenizer (default google-bert/bert-base-uncased).
The vision architecture is read from the checkpoint's shapes (v1.0: ViT-L/16 at 224 px).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from alignprop.errors import UserError, first_line
from alignprop.rewards.base import Reward, RewardResult
from alignprop.rewards.hf_clip import quiet_transformers
from alignprop.rewards.loading import extract_state_dict, load_tensor_file, pretrained_source, resolve_file
from alignprop.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSpec, prepare
from alignprop.rewards.registry import RewardSettings, register

OPTIONS = "config.rewards.imagereward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"

# The published standardisation of the head's output (IR ImageReward.py lines 80-81, 98).
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
PROMPT_TOKENS = 35  # padding="max_length", truncation=True, max_length=35 (IR ImageReward.py line 110)
# The tokens BLIP adds to bert-base-uncased (IR blip.py lines 18-19); they do not occur in ordinary prompts.
ADDED_TOKENS = ({"bos_token": "[DEC]"}, {"additional_special_tokens": ["[ENC]"]})

VISION = "blip.visual_encoder."
TEXT = "blip.text_encoder."
# BLIP's ViTs have 64-dim heads (ViT-B 768/12, ViT-L 1024/16: IR blip.py lines 29, 35) and eps-1e-6 layer
# norms (IR vit.py line 138); the head count is not in the shapes, so it comes from the width.
VIT_HEAD_DIM = 64
VIT_LAYER_NORM_EPS = 1e-6
# The head's Linear layers sit at these indices of IR's nn.Sequential (dropouts between them, no activation:
# IR ImageReward.py lines 45-58).
HEAD_INDICES = (0, 2, 4, 6, 7)
# Checkpoint entries ImageReward's score never reads: BLIP's contrastive projections (IR blip_pretrain.py lines
# 41-42) and the text encoder's arange position_ids buffer (IR med.py line 58). Tolerated, not required.
UNUSED_KEYS = frozenset(
    {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        TEXT + "embeddings.position_ids",
    }
)
# Our BlipVisionModel names -> IR's ViT names (transformers' convert_blip_original_pytorch_to_hf.py renames the
# same way), applied in order after the "vision." prefix is removed.
VISION_RENAMES = (
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^post_layernorm\.", "norm."),
)


def imagereward_key(ours: str) -> str:
    """The ImageReward.pt key of our parameter `ours` (one of ImageRewardModel's state dict keys)."""
    part, _, rest = ours.partition(".")
    if part == "text":
        return TEXT + rest  # BlipTextModel keeps BLIP's med.py names
    if part == "head":
        index, _, tensor = rest.partition(".")
        return f"mlp.layers.{HEAD_INDICES[int(index)]}.{tensor}"
    assert part == "vision", ours
    for pattern, replacement in VISION_RENAMES:
        renamed, count = re.subn(pattern, replacement, rest)
        if count:
            return VISION + renamed
    raise AssertionError(f"no ImageReward name for {ours}")


def head(width: int) -> nn.Sequential:
    """IR's MLP(768) on the text encoder's `width`-wide [CLS] feature (768 in v1.0)."""
    widths = (width, 1024, 128, 64, 16, 1)
    return nn.Sequential(*(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])))


class ImageRewardModel(nn.Module):
    """BLIP's image encoder, its image-grounded text encoder and ImageReward's head; returns standardised scores."""

    def __init__(self, vision_config: BlipVisionConfig, text_config: BlipTextConfig):
        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)  # IR blip_pretrain.py line 37
        self.head = head(text_config.hidden_size)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # IR ImageReward.py lines 84-100 (score_gard, the differentiable path ReFL trains through).
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state  # after the ViT's final norm
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,  # bidirectional self-attention, as BLIP's encoder mode
        ).last_hidden_state
        cls_feature = text[:, 0].to(self.head[0].weight.dtype)  # IR ImageReward.py line 132: float32 at least
        return (self.head(cls_feature).squeeze(-1) - SCORE_MEAN) / SCORE_STD


def vision_config_from(state_dict: dict[str, torch.Tensor], path: Path) -> BlipVisionConfig:
    """The ViT that fits the checkpoint: width, patch, image size, depth and MLP width from its shapes."""
    needed = [
        VISION + name for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    ]
    missing = [key for key in needed if key not in state_dict]
    if missing:
        raise UserError(f"{str(path)!r} is not an ImageReward checkpoint: no {missing[0]}; check {OPTIONS}.checkpoint")
    width = state_dict[VISION + "cls_token"].shape[-1]
    patch = state_dict[VISION + "patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state_dict[VISION + "pos_embed"].shape[1] - 1)
    depth = len({key.split(".")[3] for key in state_dict if key.startswith(VISION + "blocks.")})
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=state_dict[VISION + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=max(width // VIT_HEAD_DIM, 1),
        image_size=grid * patch,
        patch_size=patch,
        layer_norm_eps=VIT_LAYER_NORM_EPS,
        hidden_act="gelu",  # nn.GELU (IR vit.py)
    )


def text_config_from(med_config: Path, encoder_width: int) -> BlipTextConfig:
    """BlipTextConfig from BLIP's med_config.json (a BertConfig); the cross-attention reads `encoder_width`-wide
    image features, the ViT's width (IR blip_pretrain.py line 36)."""
    try:
        bert = json.loads(med_config.read_text())
        settings = dict(
            vocab_size=bert["vocab_size"],
            hidden_size=bert["hidden_size"],
            intermediate_size=bert["intermediate_size"],
            num_hidden_layers=bert["num_hidden_layers"],
            num_attention_heads=bert["num_attention_heads"],
            max_position_embeddings=bert["max_position_embeddings"],
            layer_norm_eps=bert["layer_norm_eps"],
            hidden_act=bert["hidden_act"],
            pad_token_id=bert.get("pad_token_id", 0),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"{str(med_config)!r} is not a BLIP med_config.json ({first_line(error)}); check {OPTIONS}.med_config"
        ) from None
    if not bert.get("add_cross_attention") or bert.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(
            f"{str(med_config)!r} does not describe BLIP's image-grounded text encoder (add_cross_attention true, "
            f"absolute positions); check {OPTIONS}.med_config"
        )
    # is_decoder=True only makes BlipTextModel build the cross-attention layers; forward runs it as an encoder.
    return BlipTextConfig(
        **settings,
        encoder_hidden_size=encoder_width,
        is_decoder=True,
        bos_token_id=None,  # generation-only ids; BLIP's defaults lie outside a small vocabulary
        eos_token_id=None,
        sep_token_id=None,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def mapped_state_dict(model: ImageRewardModel, checkpoint: dict[str, torch.Tensor], path: Path) -> dict:
    """`checkpoint` under our names; every tensor we need present with its shape, nothing unknown left over."""
    expected = model.state_dict()
    names = {imagereward_key(ours): ours for ours in expected}
    missing = sorted(set(names) - set(checkpoint))
    unexpected = sorted(set(checkpoint) - set(names) - UNUSED_KEYS)
    wrong_shape = [
        f"{key} {tuple(checkpoint[key].shape)} vs {tuple(expected[names[key]].shape)}"
        for key in sorted(set(names) & set(checkpoint))
        if checkpoint[key].shape != expected[names[key]].shape
    ]
    reasons = [
        f"{len(keys)} {label} (e.g. {keys[0]})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if keys
    ]
    if reasons:
        raise UserError(
            f"{str(path)!r} is not an ImageReward checkpoint for this med_config: {'; '.join(reasons)}; "
            f"check {OPTIONS}.checkpoint and {OPTIONS}.med_config"
        )
    return {ours: checkpoint[key] for key, ours in names.items()}


def load_model(checkpoint: Path, med_config: Path, dtype: torch.dtype) -> ImageRewardModel:
    state_dict = extract_state_dict(load_tensor_file(checkpoint), checkpoint)
    vision_config = vision_config_from(state_dict, checkpoint)
    text_config = text_config_from(med_config, vision_config.hidden_size)
    for config in (vision_config, text_config):
        config._attn_implementation = "eager"  # transformers' BLIP modules have no SDPA path
    with torch.device("meta"):
        model = ImageRewardModel(vision_config, text_config)
    model.load_state_dict(mapped_state_dict(model, state_dict, checkpoint), assign=True)
    # position_ids is a non-persistent buffer (not in any state dict): rebuild it off the meta device.
    positions = model.text.embeddings.position_ids
    model.text.embeddings.position_ids = torch.arange(positions.shape[-1]).expand(positions.shape)
    model.vision.to(dtype)
    model.text.to(dtype)
    model.head.to(torch.promote_types(dtype, torch.float32))  # IR runs its head on float32 features
    return model


def load_tokenizer(source: str, vocab_size: int) -> BertTokenizer:
    """BLIP's tokenizer: bert-base-uncased plus [DEC] and [ENC]; it must cover the text encoder's vocabulary."""
    option = f"{OPTIONS}.tokenizer"
    source = pretrained_source(source, option)
    try:
        with quiet_transformers():
            tokenizer = BertTokenizer.from_pretrained(source)
    except Exception as error:
        raise UserError(f"cannot load a BERT tokenizer from {source!r} ({first_line(error)}); check {option}") from None
    for tokens in ADDED_TOKENS:
        tokenizer.add_special_tokens(tokens)
    # transformers builds a 5-token tokenizer, without complaint, from a directory lacking vocab.txt.
    if len(tokenizer) != vocab_size:
        raise UserError(
            f"the tokenizer in {source!r} has {len(tokenizer)} tokens with [DEC] and [ENC], but the text encoder "
            f"expects {vocab_size}; check {option}"
        )
    return tokenizer


class ImageReward(Reward):
    def __init__(self, model: ImageRewardModel, tokenizer: BertTokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        size = model.vision.config.image_size
        # torchvision's Resize(size) + CenterCrop(size) on a PIL image (IR ImageReward.py lines 30-37).
        self.spec = ImageSpec(
            resize=size, crop=(size, size), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, crop_offset="round"
        )

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=PROMPT_TOKENS, return_tensors="pt"
        )
        device = self.model.head[0].weight.device
        return encoded.input_ids.to(device), encoded.attention_mask.to(device)

    def score(self, images, prompts):
        pixels = prepare(images, self.spec).to(self.model.vision.embeddings.patch_embedding.weight.dtype)
        reward = self.model(pixels, *self.tokens(prompts))
        return RewardResult(loss=-reward, reward=reward.detach())


def loaded_files(options) -> tuple[Path, Path]:
    checkpoint = resolve_file(options.checkpoint, options.repo, CHECKPOINT_FILE, f"{OPTIONS}.checkpoint")
    med_config = resolve_file(options.med_config, options.repo, MED_CONFIG_FILE, f"{OPTIONS}.med_config")
    return checkpoint, med_config


@register("imagereward", section="imagereward")
def build(settings: RewardSettings) -> ImageReward:
    options = settings.options
    checkpoint, med_config = loaded_files(options)
    with quiet_transformers():
        model = load_model(checkpoint, med_config, settings.dtype)
    return ImageReward(model, load_tokenizer(options.tokenizer, model.text.config.vocab_size))
