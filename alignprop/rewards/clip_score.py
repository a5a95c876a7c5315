"""CLIP score reward: how well the image matches its prompt under a CLIP model.

score = cosine(image embedding, prompt embedding), raw (the CLIPScore paper reports 2.5 x max(score, 0);
others report 100 x score). ViT-L/14 gives roughly 0.2-0.35 for images that match their prompt.
loss = 1 - score.

Weights (config.rewards.clip_score): `model` is any transformers CLIPModel, hub id or local directory
(default openai/clip-vit-large-patch14); `processor` its tokenizer and image processor (empty: the model's).
"""

from __future__ import annotations

from alignprop.rewards.base import Reward, RewardResult
from alignprop.rewards.hf_clip import ClipEmbedder, load_clip_embedder
from alignprop.rewards.registry import RewardSettings, register


class ClipScore(Reward):
    def __init__(self, clip: ClipEmbedder):
        super().__init__()
        self.clip = clip

    def score(self, images, prompts):
        reward = (self.clip.image_embeddings(images) * self.clip.text_embeddings(prompts)).sum(dim=-1)
        return RewardResult(loss=1 - reward, reward=reward.detach())


@register("clip_score", section="clip_score")
def build(settings: RewardSettings) -> ClipScore:
    return ClipScore(load_clip_embedder(settings, "config.rewards.clip_score"))
