import json

import open_clip
import pytest
import torch

from alignprop.errors import UserError
from alignprop.rewards.hps import HPS, checkpoint_filename
from alignprop.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSpec, prepare

PROMPTS = ["a cat", "a watercolor painting of a fox in the snow"]


def test_builds_from_disk_and_is_differentiable(load_reward, images, check_reward):
    reward = load_reward("hps")
    assert isinstance(reward, HPS)
    expected = ImageSpec(32, (32, 32), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, crop_offset="round")
    assert reward.spec == expected
    result = check_reward(reward, images)
    assert torch.allclose(result.loss, 1 - result.reward)
    assert (result.reward.abs() <= 1 + 1e-6).all()


def test_bf16_uses_open_clip_mixed_precision(load_reward, images, check_reward):
    reward = load_reward("hps", dtype=torch.bfloat16)
    assert reward.model.visual.conv1.weight.dtype == torch.bfloat16
    assert reward.model.ln_final.weight.dtype == torch.float32  # open_clip keeps layer norms in fp32
    result = check_reward(reward, images)
    fp32 = load_reward("hps").score(images, PROMPTS).reward
    assert torch.allclose(result.reward, fp32, atol=0.03)


def test_score_is_the_normalised_dot_product(load_reward, tiny_open_clip, hps_checkpoint, images):
    """Recompute the seed's formula by hand with open_clip's own model and tokenizer."""
    model = open_clip.create_model(tiny_open_clip, pretrained=None, output_dict=True)
    model.load_state_dict(torch.load(hps_checkpoint, weights_only=True)["state_dict"])
    model.eval()
    pixels = prepare(images, ImageSpec(resize=32, crop=(32, 32), crop_offset="round"))
    outputs = model(pixels, open_clip.get_tokenizer(tiny_open_clip)(PROMPTS))  # features come out normalised
    expected = torch.diagonal(outputs["image_features"] @ outputs["text_features"].T)
    image = model.encode_image(pixels)
    text = model.encode_text(open_clip.get_tokenizer(tiny_open_clip)(PROMPTS))
    by_hand = (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))
    reward = load_reward("hps").score(images, PROMPTS).reward
    assert torch.allclose(expected, by_hand, atol=1e-5)
    assert torch.allclose(reward, expected, atol=1e-5)


def test_versions_pick_the_published_files():
    assert checkpoint_filename("v2.0") == "HPS_v2_compressed.pt"
    assert checkpoint_filename("v2.1") == "HPS_v2.1_compressed.pt"
    with pytest.raises(UserError, match=r"config.rewards.hps.version='v3' is unknown; choose one of v2.0, v2.1"):
        checkpoint_filename("v3")


def test_missing_checkpoint(load_reward, tmp_path):
    with pytest.raises(UserError, match=r"does not exist; set config.rewards.hps.checkpoint"):
        load_reward("hps", options={"hps.checkpoint": str(tmp_path / "HPS_v2_compressed.pt")})


def test_checkpoint_of_another_model_is_refused(load_reward, aesthetic_head_file):
    with pytest.raises(UserError, match=r"not a HPSv2 alignprop-test-tiny-vit checkpoint: \d+ missing"):
        load_reward("hps", options={"hps.checkpoint": str(aesthetic_head_file)})


def test_checkpoint_of_another_architecture_is_refused(load_reward, tiny_open_clip, tmp_path):
    """The tiny checkpoint against a wider architecture: same keys, other shapes."""
    wider = dict(open_clip.get_model_config(tiny_open_clip), embed_dim=24)
    (tmp_path / "alignprop-test-wider-vit.json").write_text(json.dumps(wider))
    open_clip.add_model_config(tmp_path / "alignprop-test-wider-vit.json")
    with pytest.raises(UserError, match=r"not a HPSv2 alignprop-test-wider-vit checkpoint: 2 wrong shape"):
        load_reward("hps", options={"hps.model_name": "alignprop-test-wider-vit"})


def test_unknown_architecture(load_reward):
    with pytest.raises(UserError, match=r"config.rewards.hps.model_name='ViT-Nope' is not an open_clip"):
        load_reward("hps", options={"hps.model_name": "ViT-Nope"})
