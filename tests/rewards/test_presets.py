import pytest
import torch

from alignprop.rewards import build_reward


@pytest.mark.parametrize(("preset_name", "reward_type"), [("aesthetic", "Aesthetic"), ("hps_k1", "HPS")])
def test_paper_presets_build_their_reward_from_local_weights(tiny_reward_config, preset_name, reward_type, images):
    config = tiny_reward_config(preset_name=preset_name)
    reward = build_reward(config, torch.device("cpu"), torch.bfloat16)
    assert type(reward).__name__ == reward_type
    assert reward.spec.mode == "original"  # the paper presets preprocess as the original code did
    square = images[..., :40, :40]
    result = reward.score(square, ["a cat", "a dog"])
    assert result.loss.shape == result.reward.shape == (2,)


def test_defaults_name_the_published_weights(preset):
    rewards = preset("hps").rewards
    assert rewards.aesthetic.clip_model == "openai/clip-vit-large-patch14"
    assert (rewards.aesthetic.head_path, rewards.aesthetic.head_repo) == ("", "")  # the shipped head
    assert (rewards.hps.repo, rewards.hps.version, rewards.hps.model_name) == (
        "xswu/HPSv2",
        "v2.0",
        "ViT-H-14",
    )
    assert rewards.pickscore.model == "yuvalkirstain/PickScore_v1"
    assert rewards.pickscore.processor == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
