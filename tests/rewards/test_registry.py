"""The registry: builders get their own options section and the shared settings; reward modules load lazily."""

import subprocess
import sys
import textwrap

import pytest
import torch
from ml_collections import ConfigDict

from alignprop.errors import UserError
from alignprop.rewards.registry import reward_settings

PROMPTS = ["a cat", "a dog"]


def test_importing_the_registry_imports_no_reward_module():
    """Dependencies point down: the generic registry does not import the toy world (nor the model libraries)
    until a reward is looked up; the lookup then sees every reward, the toy world's included."""
    script = textwrap.dedent(
        """
        import sys
        from alignprop.rewards import REGISTRY
        loaded = sorted(m for m in sys.modules if m.startswith(("alignprop.toyworld", "open_clip", "transformers")))
        assert not loaded, loaded
        names = set(REGISTRY)
        assert {"aesthetic", "hps", "combined", "toyworld_shape", "toyworld_colour"} <= names, names
        assert "alignprop.toyworld.rewards" in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_a_builder_gets_its_section_and_the_shared_settings(tiny_reward_config):
    config = tiny_reward_config("hps")
    config.aesthetic_target, config.grad_scale, config.rewards.preprocess = 7.0, 2.5, "original"
    settings = reward_settings("hps", config, torch.bfloat16)
    assert settings.options is config.rewards.hps
    assert (settings.dtype, settings.aesthetic_target, settings.grad_scale) == (torch.bfloat16, 7.0, 2.5)
    assert settings.preprocess == "original"
    assert reward_settings("toyworld_area", config, torch.float32).options is config.rewards.toyworld
    assert reward_settings("colorfulness", config, torch.float32).options is None


def test_combined_builds_its_parts_through_the_same_path(load_reward):
    combined = load_reward(
        "combined",
        options={"combination": "aesthetic:1.0,hps:0.5", "preprocess": "original"},
        aesthetic_target=None,
        grad_scale=3.0,
    )
    aesthetic, hps = combined.components["aesthetic"], combined.components["hps"]
    assert aesthetic.spec.mode == hps.spec.mode == "original"
    assert (aesthetic.target, aesthetic.grad_scale) == (None, 3.0)
    alone = load_reward("aesthetic", options={"preprocess": "original"}, aesthetic_target=None, grad_scale=3.0)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(combined.score(images, PROMPTS).metrics["aesthetic"], alone.score(images, PROMPTS).reward)


def test_a_minimal_config_builds_weight_free_rewards_and_names_a_missing_section():
    from alignprop.rewards import build_reward

    reward = build_reward(ConfigDict({"reward_fn": "colorfulness"}), torch.device("cpu"), torch.float32)
    assert reward.score(torch.zeros(1, 3, 8, 8), [""]).reward.item() == pytest.approx(0, abs=0.01)  # grey scores 0
    with pytest.raises(UserError, match=r"^reward_fn='hps' needs config.rewards.hps"):
        build_reward(ConfigDict({"reward_fn": "hps"}), torch.device("cpu"), torch.float32)
