import pytest
import torch

from alignprop.errors import UserError
from alignprop.presets import load_preset
from alignprop.rewards import REGISTRY, build_reward
from alignprop.toyworld import rewards
from alignprop.toyworld.captions import caption, parse
from alignprop.toyworld.world import SHAPES

NAMES = ("toyworld_colour", "toyworld_shape", "toyworld_area", "toyworld_position")


def build(name, **options):
    config = load_preset("tiny")
    config.reward_fn = name
    config.rewards.toyworld.update(options)
    return build_reward(config, torch.device("cpu"), torch.float32)


def other_shape(shape):
    return SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]


def test_rewards_are_registered():
    assert set(NAMES) <= set(REGISTRY)


def test_learned_reward_accuracy_on_rendered_images(rendered):
    """The CNN never saw these scenes; its argmax must name the rendered shape."""
    model = rewards.load_classifier("")
    with torch.no_grad():
        predicted = model(rendered.images).argmax(dim=1)
    truth = torch.tensor([SHAPES.index(s.shape) for s in rendered.scenes])
    assert (predicted == truth).float().mean().item() >= 0.98  # measured: 0.999 on 1000 test scenes


def test_learned_reward_prefers_the_requested_shape(rendered):
    reward = build("toyworld_shape")
    right = reward.score(rendered.images[:60], rendered.captions[:60])
    wrong_prompts = [caption(other_shape(s.shape), s.colour, s.background) for s in rendered.scenes[:60]]
    wrong = reward.score(rendered.images[:60], wrong_prompts)
    assert right.reward.mean() > 0.9 > 0.1 > wrong.reward.mean()
    assert (right.loss < wrong.loss).all()
    assert right.metrics["checker_shape"].all() and not wrong.metrics["checker_shape"].any()


def test_colour_reward_prefers_the_requested_colour(rendered):
    reward = build("toyworld_colour")
    scenes = rendered.scenes[:60]
    right = reward.score(rendered.images[:60], rendered.captions[:60]).reward
    swapped = reward.score(rendered.images[:60], [caption(s.shape, s.background, s.colour) for s in scenes]).reward
    areas = torch.tensor([s.area for s in scenes])
    assert torch.allclose(right, areas, atol=0.05)  # the shape's pixels are the shape colour
    assert (swapped > right).all()  # the background covers more of the image than the shape


def test_geometry_rewards_agree_with_the_checker(rendered):
    images, prompts = rendered.images[:60], rendered.captions[:60]
    area = build("toyworld_area", area_target=0.3).score(images, prompts)
    truth = torch.tensor([s.area for s in rendered.scenes[:60]])
    assert torch.allclose(area.reward, -(truth - 0.3).abs(), atol=0.02)
    assert torch.allclose(area.metrics["checker_area"], truth, atol=0.02)
    position = build("toyworld_position", position_target=(0.25, 0.75)).score(images, prompts)
    centres = torch.tensor([[s.cx, s.cy] for s in rendered.scenes[:60]]) / 32
    expected = -(centres - torch.tensor([0.25, 0.75])).norm(dim=1)
    assert torch.allclose(position.reward, expected, atol=0.02)


@pytest.mark.parametrize("name", NAMES)
def test_rewards_are_differentiable(rendered, name):
    images = rendered.images[:4].clone().requires_grad_(True)
    result = build(name).score(images, rendered.captions[:4])
    result.loss.sum().backward()
    assert result.loss.shape == (4,) and images.grad.abs().sum() > 0
    assert {"checker_prompt", "checker_shape", "checker_area"} <= set(result.metrics)


def test_rewards_refuse_prompts_outside_the_grammar(rendered):
    with pytest.raises(UserError, match="toy-world captions"):
        build("toyworld_area").score(rendered.images[:1], ["a photo of a cat"])
    with pytest.raises(UserError, match="colour_target"):
        build("toyworld_colour", colour_target="magenta")
    assert parse(rendered.captions[0])  # the fixture's captions are in the grammar
