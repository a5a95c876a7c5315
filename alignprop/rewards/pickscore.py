"""PickScore reward (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic human preferences.

score = logit_scale.exp() x cosine(image embedding, prompt embedding), as in the authors' inference code;
logit_scale.exp() is about 100, and Stable Diffusion 1.5 images score around 20-21. loss = -score.

Weights (config.rewards.pickscore):
  model      hub id or local directory of the CLIPModel (default yuvalkirstain/PickScore_v1);
  processor  tokenizer and image processor settings; the authors used those of
             laion/CLIP-ViT-H-14-laion2B-s32B-b79K (224 px, bicubic, centre crop, CLIP mean/std).
"""

from __future__ import annotations

from alignprop.rewards.base import Reward, RewardResult
from alignprop.rewards.hf_clip import ClipEmbedder, load_clip_embedder
from alignprop.rewards.registry import RewardSettings, register


class PickScore(Reward):
    def __init__(self, clip: ClipEmbedder):
        super().__init__()
        self.clip = clip

    def score(self, images, prompts):
        cosine = (self.clip.image_embeddings(images) * self.clip.text_embeddings(prompts)).sum(dim=-1)
        reward = self.clip.model.logit_scale.float().exp() * cosine
        return RewardResult(loss=-reward, reward=reward.detach(), metrics={"cosine": cosine.detach()})


@register("pickscore", section="pickscore")
def build(settings: RewardSettings) -> PickScore:
    return PickScore(load_clip_embedder(settings, "config.rewards.pickscore"))
