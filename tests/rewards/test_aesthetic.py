import pytest
import torch
from transformers import CLIPVisionModelWithProjection

from alignprop.errors import UserError
from alignprop.rewards.aesthetic import Aesthetic, AestheticHead
from alignprop.rewards.preprocess import ImageSpec, prepare


def test_builds_from_disk_and_is_differentiable(load_reward, images, check_reward):
    reward = load_reward("aesthetic")
    assert isinstance(reward, Aesthetic)
    assert reward.vision.dtype == torch.float32
    assert reward.vision.config._attn_implementation == "sdpa"
    check_reward(reward, images)


def test_bf16_backbone_with_float32_head(load_reward, images, check_reward):
    reward = load_reward("aesthetic", dtype=torch.bfloat16)
    assert reward.vision.dtype == torch.bfloat16
    assert reward.head.layers[0].weight.dtype == torch.float32
    result = check_reward(reward, images)
    assert result.reward.dtype == torch.float32
    fp32 = load_reward("aesthetic").score(images, ["a"] * 2).reward
    assert torch.allclose(result.reward, fp32, atol=0.05)


def test_head_matches_hand_computation(aesthetic_head_file):
    tensors = torch.load(aesthetic_head_file, weights_only=True)
    head = AestheticHead(in_features=16)
    head.load_state_dict(tensors)
    head.eval()
    embeddings = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    expected = embeddings
    for index in (0, 2, 4, 6, 7):  # linear layers only: the dropouts are identities in eval mode
        expected = expected @ tensors[f"layers.{index}.weight"].T + tensors[f"layers.{index}.bias"]
    assert torch.allclose(head(embeddings), expected.squeeze(-1), atol=1e-6)


def test_reward_is_head_of_unit_clip_embedding(load_reward, tiny_clip_dir, images):
    reward = load_reward("aesthetic")
    vision = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir)
    pixels = prepare(images, ImageSpec(resize=32, crop=(32, 32)))
    embedding = vision(pixel_values=pixels).image_embeds
    expected = reward.head(embedding / embedding.norm(dim=-1, keepdim=True))
    assert torch.allclose(reward.score(images, [""] * 2).reward, expected, atol=1e-5)


def test_loss_modes(load_reward, images):
    towards_target = load_reward("aesthetic", aesthetic_target=10.0, grad_scale=2.0).score(images, [""] * 2)
    assert torch.allclose(towards_target.loss, (towards_target.reward - 10.0).abs() * 2.0)
    maximise = load_reward("aesthetic", aesthetic_target=None, grad_scale=3.0).score(images, [""] * 2)
    assert torch.allclose(maximise.loss, -maximise.reward * 3.0)


def test_missing_head_file_names_the_option(load_reward, tmp_path):
    with pytest.raises(UserError, match=r"does not exist; set config.rewards.aesthetic.head_path"):
        load_reward("aesthetic", options={"aesthetic.head_path": str(tmp_path / "nope.pth")})


def test_head_of_the_wrong_size_is_refused(load_reward, tmp_path):
    path = tmp_path / "l14-head.pth"
    torch.save(AestheticHead(in_features=768).state_dict(), path)  # a real ViT-L/14 head on a 16-dim CLIP
    with pytest.raises(UserError, match=r"not a LAION aesthetic head checkpoint: 1 wrong shape"):
        load_reward("aesthetic", options={"aesthetic.head_path": str(path)})


def test_state_dict_of_another_model_is_refused(load_reward, hps_checkpoint):
    with pytest.raises(UserError, match=r"not a LAION aesthetic head checkpoint: 10 missing"):
        load_reward("aesthetic", options={"aesthetic.head_path": str(hps_checkpoint)})


def test_missing_clip_directory(load_reward, tmp_path):
    with pytest.raises(UserError, match=r"config.rewards.aesthetic.clip_model"):
        load_reward("aesthetic", options={"aesthetic.clip_model": str(tmp_path / "missing" / "clip")})
