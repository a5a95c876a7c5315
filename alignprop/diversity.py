"""How different an evaluation's images are: mean pairwise cosine distance of their image embeddings.

- `diversity_within_prompt_mean`: for every prompt with at least 2 images, the mean of 1 - cos(e_a, e_b) over the
  pairs of its images; averaged over those prompts (equal weight per prompt). Absent when no prompt has 2 images.
- `diversity_across_prompts_mean`: the same mean over every pair of the evaluation's images, whatever their prompts.
  Absent with fewer than 2 images.

Either falling while the reward rises is mode collapse: the model draws one picture per prompt (within) or one
picture for every prompt (across), whatever the noise.

The embeddings come from an image encoder a reward of the run already holds (`eval_diversity_encoder`): the CLIP
image tower of clip_score / pickscore (transformers CLIPModel), hps (open_clip ViT-H-14) or aesthetic (CLIP
ViT-L/14), or, in the toy world, the shape classifier's pooled features (toyworld_shape). "auto" takes the first of
those in `ENCODERS` order that the run builds (reward_fn or eval_reward_fns); none of them: no diversity numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from alignprop.rewards import Reward, listed_rewards

ENCODERS = ("clip_score", "pickscore", "hps", "aesthetic", "toyworld_shape")  # "auto" tries them in this order
ENCODER_CHOICES = ("auto", "off", *ENCODERS)
# "_mean" as every averaged number of an evaluation: curves.png draws them beside the rewards.
WITHIN, ACROSS = "diversity_within_prompt_mean", "diversity_across_prompts_mean"

Embedder = Callable[[torch.Tensor], torch.Tensor]  # images (N, 3, H, W) in [-1, 1] -> embeddings (N, D)


def mean_pairwise_cosine_distance(embeddings: torch.Tensor) -> float:
    """Mean of 1 - cos(e_a, e_b) over the pairs a < b of the rows (at least 2), in float64."""
    unit = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    first, second = torch.triu_indices(len(unit), len(unit), offset=1)
    return (1 - (unit[first] * unit[second]).sum(dim=-1)).mean().item()


def diversity(embeddings: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """The module docstring's numbers for images with these embeddings and prompts (same order); images of the same
    prompt text count as one prompt's."""
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(index)
    within = [mean_pairwise_cosine_distance(embeddings[rows]) for rows in groups.values() if len(rows) >= 2]
    numbers = {}
    if within:
        numbers[WITHIN] = sum(within) / len(within)
    if len(prompts) >= 2:
        numbers[ACROSS] = mean_pairwise_cosine_distance(embeddings)
    return numbers


def encoder_name(config) -> str | None:
    """The reward whose image encoder `config.eval_diversity_encoder` picks among the run's rewards; None: off."""
    choice = config.eval_diversity_encoder
    if choice == "off":
        return None
    if choice != "auto":
        return choice  # schema.check_diversity_encoder: it is one of the run's rewards
    built = {config.reward_fn, *listed_rewards(config.eval_reward_fns)}
    return next((name for name in ENCODERS if name in built), None)


def embedder_of(reward: Reward) -> Embedder | None:
    """The image encoder inside a built reward (see the module docstring); None for a reward without one."""
    from alignprop.rewards.aesthetic import Aesthetic
    from alignprop.rewards.clip_score import ClipScore
    from alignprop.rewards.hps import HPS
    from alignprop.rewards.pickscore import PickScore
    from alignprop.rewards.relative import Relative
    from alignprop.toyworld.rewards import LearnedShapeReward

    while isinstance(reward, Relative):  # SRPO's relative reward scores through its base reward's model
        reward = reward.base
    if isinstance(reward, ClipScore | PickScore):
        return reward.clip.image_embeddings
    if isinstance(reward, HPS):
        return reward.image_features
    if isinstance(reward, Aesthetic):
        return reward.embed
    if isinstance(reward, LearnedShapeReward):
        return lambda images: reward.model.features(images.float()).mean(dim=(2, 3))
    return None


def embedder_for(config, rewards: dict[str, Reward]) -> Embedder | None:
    """The embedder of `encoder_name(config)` among the run's built rewards (name -> reward)."""
    name = encoder_name(config)
    return None if name is None or name not in rewards else embedder_of(rewards[name])
