import pytest
import torch
from transformers import CLIPModel, CLIPTokenizer

from alignprop.errors import UserError
from alignprop.rewards.pickscore import PickScore
from alignprop.rewards.preprocess import ImageSpec, prepare

PROMPTS = ["a cat", "a watercolor painting of a fox in the snow"]


def test_builds_from_disk_and_is_differentiable(load_reward, images, check_reward):
    reward = load_reward("pickscore")
    assert isinstance(reward, PickScore)
    assert reward.clip.model.config._attn_implementation == "sdpa"
    assert reward.clip.spec == ImageSpec(resize=32, crop=(32, 32))
    result = check_reward(reward, images, PROMPTS)
    assert torch.allclose(result.loss, -result.reward)


def test_bf16(load_reward, images, check_reward):
    reward = load_reward("pickscore", dtype=torch.bfloat16)
    assert reward.clip.model.dtype == torch.bfloat16
    result = check_reward(reward, images, PROMPTS)
    fp32 = load_reward("pickscore").score(images, PROMPTS).reward
    assert torch.allclose(result.reward, fp32, atol=0.5)  # logit scale ~14 here (~100 in PickScore)


def test_score_is_the_models_own_image_text_logit(load_reward, tiny_clip_dir, images):
    """The authors' formula, logit_scale.exp() x cosine, is CLIPModel's logits_per_image diagonal."""
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    tokens = CLIPTokenizer.from_pretrained(tiny_clip_dir)(PROMPTS, padding=True, return_tensors="pt")
    pixels = prepare(images, ImageSpec(resize=32, crop=(32, 32)))
    expected = torch.diagonal(model(pixel_values=pixels, **tokens).logits_per_image)
    result = load_reward("pickscore").score(images, PROMPTS)
    assert torch.allclose(result.reward, expected, atol=1e-4)
    assert torch.allclose(result.metrics["cosine"] * model.logit_scale.exp(), expected, atol=1e-4)


def test_processor_without_vocabulary(load_reward, tmp_path):
    with pytest.raises(UserError, match=r"tokenizer in .* has 2 tokens but the text model expects 514; check config."):
        load_reward("pickscore", options={"pickscore.processor": str(tmp_path)})


def test_processor_without_image_settings(load_reward, tiny_clip_dir, tmp_path):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_clip_dir / name).read_bytes())
    with pytest.raises(UserError, match=r"cannot load a CLIP image processor config from .*pickscore.processor"):
        load_reward("pickscore", options={"pickscore.processor": str(tmp_path)})


def test_model_directory_without_weights(load_reward, tmp_path):
    with pytest.raises(UserError, match=r"cannot load CLIPModel from .*check config.rewards.pickscore.model"):
        load_reward("pickscore", options={"pickscore.model": str(tmp_path)})
