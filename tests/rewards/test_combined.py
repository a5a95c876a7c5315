import pytest
import torch

from alignprop.errors import UserError
from alignprop.rewards import REGISTRY, RewardSettings
from alignprop.rewards.combined import Combined, parse_combination

PROMPTS = ["a cat", "a watercolor painting of a fox in the snow"]


def test_parse():
    assert parse_combination("aesthetic:1.0, hps:0.5") == {"aesthetic": 1.0, "hps": 0.5}
    assert parse_combination("colorfulness") == {"colorfulness": 1.0}
    assert parse_combination("compressibility:-2,") == {"compressibility": -2.0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"reward_fn='combined' needs config.rewards.combination, e.g. 'aesthetic:1.0,hps:0.5'"),
        ("aesthetic:1,aesthetic:2", r"'aesthetic' is listed twice"),
        ("hps:lots", r"weight 'lots' of 'hps' is not a number"),
        ("beauty:1", r"unknown reward_fn 'beauty'"),
        ("combined:1", r"'combined' cannot be a component of itself"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_combination(text)


def test_weighted_sum_and_per_component_metrics(load_reward, images):
    combined = load_reward("combined", options={"combination": "colorfulness:2.0,compressibility:-0.5"})
    assert isinstance(combined, Combined)
    parts = {name: REGISTRY[name].build(RewardSettings()).score(images, PROMPTS) for name in combined.weights}
    result = combined.score(images, PROMPTS)
    colorful, compress = parts["colorfulness"], parts["compressibility"]
    assert torch.allclose(result.loss, 2.0 * colorful.loss - 0.5 * compress.loss)
    assert torch.allclose(result.reward, 2.0 * colorful.reward - 0.5 * compress.reward)
    assert set(result.metrics) == {"colorfulness", "compressibility", "compressibility/jpeg_kb"}
    assert torch.equal(result.metrics["colorfulness"], colorful.reward)
    assert torch.equal(result.metrics["compressibility/jpeg_kb"], compress.metrics["jpeg_kb"])


def test_model_rewards_combine_and_stay_frozen(load_reward, images, check_reward):
    combined = load_reward("combined", options={"combination": "aesthetic:1.0,hps:0.5"})
    assert set(combined.components) == {"aesthetic", "hps"}
    result = check_reward(combined, images, PROMPTS)
    expected = result.metrics["aesthetic"] + 0.5 * result.metrics["hps"]
    assert torch.allclose(result.reward, expected)
