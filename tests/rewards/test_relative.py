"""SRPO's relative reward: the same reward with a positive and a negative control phrase, differenced."""

import pytest
import torch

from alignprop.errors import UserError
from alignprop.rewards.relative import Relative

PROMPTS = ["a cat", "a watercolor painting of a fox in the snow"]
CONTROL = ("Realistic photo,", "CG render,")


@pytest.mark.parametrize("name", ["hps", "clip_score", "pickscore"])
def test_relative_reward_is_the_difference_of_the_two_phrasings(load_reward, images, check_reward, name):
    relative = load_reward(name, options={"relative_control": CONTROL})
    plain = load_reward(name)
    assert isinstance(relative, Relative)
    result = check_reward(relative, images, PROMPTS)
    positive = plain.score(images, [f"Realistic photo, {p}" for p in PROMPTS]).reward
    negative = plain.score(images, [f"CG render, {p}" for p in PROMPTS]).reward
    torch.testing.assert_close(result.reward, positive - negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.loss, negative - positive, rtol=0, atol=1e-6)  # loss = -(relative reward)
    assert result.reward.abs().max() > 0  # the phrases change the score: something to learn from


@pytest.mark.parametrize(
    "name, control, words",
    [
        ("aesthetic", CONTROL, "reads the prompt"),
        ("hps", ("same", "same"), "two different phrases"),
        ("hps", ("only one",), "two different phrases"),
    ],
)
def test_bad_control_is_one_line(load_reward, name, control, words):
    with pytest.raises(UserError, match=words):
        load_reward(name, options={"relative_control": control})


def test_a_control_on_a_reward_without_prompts_is_refused_before_the_run(preset, tmp_path):
    from alignprop import jobs

    config = preset("tiny")
    config.logdir = str(tmp_path / "logs")
    config.rewards.relative_control = CONTROL
    with pytest.raises(UserError, match="reads the prompt"):
        jobs.prepare(config, num_processes=1)
    assert not (tmp_path / "logs").exists()
