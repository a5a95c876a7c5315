"""Tiny random reward backbones written to disk, then loaded by the rewards' real loaders.

- a transformers CLIPModel (vision 32 px, patch 8, hidden 32, projection 16) with a character-level
  tokenizer and a CLIP image processor config, saved with save_pretrained: the aesthetic, PickScore and
  CLIP-score backbones;
- a random LAION-style aesthetic head for that 16-dim embedding (.pth state dict);
- a tiny open_clip architecture registered at runtime, with an HPSv2-style checkpoint
  ({"state_dict": ..., "epoch": ...}, fp16 tensors like the published "compressed" files).
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from alignprop.rewards import build_reward
from alignprop.rewards.aesthetic import AestheticHead
from alignprop.tiny import tiny_text_settings, write_tokenizer_files

TINY_OPEN_CLIP = "alignprop-test-tiny-vit"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
PROMPTS = ["a cat", "a watercolor painting of a fox in the snow"]


def tiny_clip_config(vocab_size: int) -> CLIPConfig:
    text = {**tiny_text_settings(vocab_size), "projection_dim": 16}
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    write_tokenizer_files(directory)
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=77)
    CLIPModel(tiny_clip_config(len(tokenizer))).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def aesthetic_head_file(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("aesthetic") / "head.pth"
    torch.save(AestheticHead(in_features=16).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """Registers the tiny architecture with open_clip; returns its name."""
    config_file = tmp_path_factory.mktemp("open-clip-config") / f"{TINY_OPEN_CLIP}.json"
    config_file.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config_file)
    return TINY_OPEN_CLIP


@pytest.fixture(scope="session")
def hps_checkpoint(tmp_path_factory, tiny_open_clip):
    torch.manual_seed(2)
    model = open_clip.create_model(tiny_open_clip, pretrained=None)
    state_dict = {key: value.half() for key, value in model.state_dict().items()}
    path = tmp_path_factory.mktemp("hps") / "HPS_tiny_compressed.pt"
    torch.save({"epoch": 1, "name": "tiny", "state_dict": state_dict}, path)
    return path


@pytest.fixture(scope="session")
def tiny_reward_config(preset, tiny_clip_dir, aesthetic_head_file, tiny_open_clip, hps_checkpoint):
    """tiny_reward_config(reward_fn=None, preset_name="aesthetic") -> that preset with every reward pointed
    at tiny local weights (no hub access); reward_fn None keeps the preset's."""

    def make(reward_fn: str | None = None, preset_name: str = "aesthetic"):
        config = preset(preset_name)
        config.reward_fn = reward_fn or config.reward_fn
        rewards = config.rewards
        rewards.aesthetic.clip_model = str(tiny_clip_dir)
        rewards.aesthetic.head_path = str(aesthetic_head_file)
        rewards.hps.checkpoint = str(hps_checkpoint)
        rewards.hps.model_name = tiny_open_clip
        for name in ("pickscore", "clip_score"):
            rewards[name].model = str(tiny_clip_dir)
            rewards[name].processor = str(tiny_clip_dir)
        return config

    return make


@pytest.fixture(scope="session")
def load_reward(tiny_reward_config):
    """load_reward(reward_fn, dtype, options={"aesthetic.head_path": ...}, **top_level_overrides) -> a frozen
    reward on CPU, built by build_reward; `options` keys are paths under config.rewards. Preprocessing is the
    models' own ("processor", which crops the non-square test images) unless options say otherwise."""

    def load(reward_fn: str, dtype: torch.dtype = torch.float32, options=None, **overrides):
        config = tiny_reward_config(reward_fn)
        config.rewards.preprocess = "processor"
        config.update(overrides)
        for path, value in (options or {}).items():
            *sections, key = path.split(".")
            node = config.rewards
            for section in sections:
                node = node[section]
            node[key] = value
        return build_reward(config, torch.device("cpu"), dtype)

    return load


def sample_images(seed: int = 0, shape=(2, 3, 40, 48)) -> torch.Tensor:
    """Non-square images in [-1, 1] so both the resize and the centre crop are exercised."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) * 2 - 1).requires_grad_(True)


@pytest.fixture
def images():
    return sample_images()


@pytest.fixture(scope="session")
def check_reward():
    """check_reward(reward, images): the contract every reward must keep; returns the RewardResult."""

    def check(reward, images, prompts=PROMPTS):
        assert not reward.training
        assert not any(p.requires_grad for p in reward.parameters())
        result = reward.score(images, prompts)
        assert result.loss.shape == result.reward.shape == (images.shape[0],)
        assert torch.isfinite(result.loss).all() and torch.isfinite(result.reward).all()
        assert result.loss.requires_grad and not result.reward.requires_grad
        images.grad = None
        result.loss.sum().backward()
        assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
        assert all(p.grad is None for p in reward.parameters())
        return result

    return check
