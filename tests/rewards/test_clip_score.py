import torch
from transformers import CLIPModel, CLIPTokenizer

from alignprop.rewards.clip_score import ClipScore
from alignprop.rewards.preprocess import ImageSpec, prepare

PROMPTS = ["a cat", "a watercolor painting of a fox in the snow"]


def test_builds_from_disk_and_is_differentiable(load_reward, images, check_reward):
    reward = load_reward("clip_score")
    assert isinstance(reward, ClipScore)
    result = check_reward(reward, images, PROMPTS)
    assert torch.allclose(result.loss, 1 - result.reward)


def test_bf16(load_reward, images, check_reward):
    reward = load_reward("clip_score", dtype=torch.bfloat16)
    assert reward.clip.model.dtype == torch.bfloat16
    result = check_reward(reward, images, PROMPTS)
    assert torch.allclose(result.reward, load_reward("clip_score").score(images, PROMPTS).reward, atol=0.03)


def test_score_is_the_cosine_of_the_models_embeddings(load_reward, tiny_clip_dir, images):
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    tokens = CLIPTokenizer.from_pretrained(tiny_clip_dir)(PROMPTS, padding=True, return_tensors="pt")
    pixels = prepare(images, ImageSpec(resize=32, crop=(32, 32)))
    outputs = model(pixel_values=pixels, **tokens)  # image_embeds / text_embeds come out normalised
    expected = (outputs.image_embeds * outputs.text_embeds).sum(-1)
    assert torch.allclose(load_reward("clip_score").score(images, PROMPTS).reward, expected, atol=1e-5)


def test_the_prompt_matters(load_reward, images):
    reward = load_reward("clip_score")
    assert not torch.allclose(reward.score(images, PROMPTS).reward, reward.score(images, PROMPTS[::-1]).reward)
