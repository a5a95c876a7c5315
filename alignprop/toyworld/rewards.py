"""Differentiable rewards on the toy world, each with a ground-truth counterpart in the checker.

- `toyworld_colour`: soft affinity of every pixel to a target palette colour (the prompt's shape colour by
  default), averaged over the image. Ground truth: the checker's colour and background accuracy, and area
  (turning the background into the shape colour raises this reward: a hack the checker exposes).
- `toyworld_shape`: the learned reward, the frozen CNN's probability of the requested shape. Ground truth:
  the checker's shape accuracy.
- `toyworld_area`: the soft fraction of pixels that are not the prompt's background colour, pushed
  towards a target. Ground truth: the checker's area.
- `toyworld_position`: the soft foreground's centroid, pulled towards a target point. Ground truth: the
  checker's centroid.

Every reward also reports the checker's verdict on each image in `metrics` (checker_background,
checker_colour, checker_shape, checker_prompt, checker_area, ...), so evaluation logs show a reward
rising while the ground truth falls.
"""

from __future__ import annotations

import abc
from pathlib import Path

import torch

from alignprop.errors import UserError, excerpt
from alignprop.rewards.base import Reward, RewardResult
from alignprop.rewards.registry import RewardSettings, register
from alignprop.toyworld import CLASSIFIER_FILE, checker
from alignprop.toyworld import classifier as shape_classifier
from alignprop.toyworld.captions import Request, parse
from alignprop.toyworld.world import COLOURS, IMAGE_SIZE, PALETTE, SHAPES

COLOUR_TARGETS = ("shape", "background")  # or any palette colour name
# Settings: config.rewards.toyworld (classifier, colour_target, colour_temperature, area_target, position_target),
# handed to the builders as `settings.options`; their defaults and meaning are in config/align_prop.py.
OPTIONS = "toyworld"


def requests_of(prompts: list[str]) -> list[Request]:
    try:
        return [parse(prompt) for prompt in prompts]
    except ValueError as error:
        raise UserError(f"toy-world rewards need toy-world captions: {error}") from None


def palette_affinity(images: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft assignment of every pixel to the palette colours: (N, colours, H, W), summing to 1 per pixel."""
    rgb = (images.float().clamp(-1, 1) + 1) * 127.5
    palette = checker.PALETTE_RGB.to(rgb.device).view(1, -1, 3, 1, 1)
    distance2 = (rgb.unsqueeze(1) - palette).pow(2).sum(dim=2)
    return torch.softmax(-distance2 / (2 * temperature**2), dim=1)


def soft_foreground(images: torch.Tensor, requests: list[Request], temperature: float) -> torch.Tensor:
    """(N, H, W): how much each pixel is *not* the requested background colour."""
    affinity = palette_affinity(images, temperature)
    index = torch.tensor([COLOURS.index(r.background) for r in requests], device=images.device)
    return 1 - affinity[torch.arange(len(requests), device=images.device), index]


def checker_metrics(images: torch.Tensor, requests: list[Request]) -> dict[str, torch.Tensor]:
    """The ground truth, per image, for the logs."""
    verdict = checker.check(images)
    metrics = {f"checker_{k}": v.float() for k, v in checker.correctness(verdict, requests).items()}
    metrics["checker_area"] = verdict.area
    metrics["checker_x"], metrics["checker_y"] = verdict.centroid.unbind(dim=1)
    return {name: values.to(images.device) for name, values in metrics.items()}


class ToyWorldReward(Reward):
    """Parses the prompts, scores with `reward_and_loss`, and attaches the checker's verdict."""

    image_size = (IMAGE_SIZE, IMAGE_SIZE)  # the toy world's pixels: its checker reads them one by one

    def score(self, images, prompts):
        requests = requests_of(prompts)
        reward, loss = self.reward_and_loss(images, requests)
        return RewardResult(loss=loss, reward=reward.detach(), metrics=checker_metrics(images, requests))

    @abc.abstractmethod
    def reward_and_loss(self, images, requests) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (reward, differentiable loss) for the parsed requests."""


class ColourReward(ToyWorldReward):
    """Mean soft affinity of the pixels to the target colour, in [0, 1]."""

    def __init__(self, target: str, temperature: float):
        super().__init__()
        if target not in COLOUR_TARGETS and target not in PALETTE:
            raise UserError(f"colour_target={target!r}; choose one of: {', '.join((*COLOUR_TARGETS, *COLOURS))}")
        self.target, self.temperature = target, temperature

    def target_index(self, request: Request) -> int:
        if self.target == "shape":
            return COLOURS.index(request.colour)
        if self.target == "background":
            return COLOURS.index(request.background)
        return COLOURS.index(self.target)

    def reward_and_loss(self, images, requests):
        affinity = palette_affinity(images, self.temperature)
        index = torch.tensor([self.target_index(r) for r in requests], device=images.device)
        reward = affinity[torch.arange(len(requests), device=images.device), index].mean(dim=(1, 2))
        return reward, -reward


class LearnedShapeReward(ToyWorldReward):
    """The frozen CNN's probability of the requested shape; the loss is its cross-entropy."""

    def __init__(self, model: shape_classifier.ShapeClassifier):
        super().__init__()
        self.model = model

    def reward_and_loss(self, images, requests):
        logits = self.model(images.float())
        target = torch.tensor([SHAPES.index(r.shape) for r in requests], device=images.device)
        log_probability = torch.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        return log_probability.exp(), -log_probability


class AreaReward(ToyWorldReward):
    """Minus the distance between the soft foreground fraction and the target area."""

    def __init__(self, target: float, temperature: float):
        super().__init__()
        if not 0 < target < 1:
            raise UserError(f"area_target={target} must lie in (0, 1)")
        self.target, self.temperature = target, temperature

    def reward_and_loss(self, images, requests):
        area = soft_foreground(images, requests, self.temperature).mean(dim=(1, 2))
        reward = -(area - self.target).abs()
        return reward, -reward


class PositionReward(ToyWorldReward):
    """Minus the distance between the soft foreground's centroid and the target point (image units)."""

    def __init__(self, target: tuple[float, float], temperature: float):
        super().__init__()
        if len(target) != 2 or not all(0 <= v <= 1 for v in target):
            raise UserError(f"position_target={target} must be two numbers in [0, 1] (x, y)")
        self.register_buffer("target", torch.tensor(target, dtype=torch.float32), persistent=False)
        self.temperature = temperature

    def reward_and_loss(self, images, requests):
        mask = soft_foreground(images, requests, self.temperature)
        centres = (torch.arange(IMAGE_SIZE, device=images.device, dtype=torch.float32) + 0.5) / IMAGE_SIZE
        total = mask.sum(dim=(1, 2)).clamp_min(1e-6)
        x = (mask.sum(dim=1) * centres).sum(dim=1) / total
        y = (mask.sum(dim=2) * centres).sum(dim=1) / total
        reward = -(torch.stack([x, y], dim=1) - self.target).norm(dim=1)
        return reward, -reward


def load_classifier(path: str) -> shape_classifier.ShapeClassifier:
    file = Path(path).expanduser() if path else CLASSIFIER_FILE
    if not file.is_file():
        raise UserError(
            f"no toy-world shape classifier at {excerpt(str(file))} (train one: python -m "
            "alignprop.toyworld.train_classifier)"
        )
    return shape_classifier.load(file)


@register("toyworld_colour", section=OPTIONS)
def build_colour(settings: RewardSettings) -> ColourReward:
    options = settings.options
    return ColourReward(options.colour_target, options.colour_temperature)


@register("toyworld_shape", section=OPTIONS)
def build_shape(settings: RewardSettings) -> LearnedShapeReward:
    return LearnedShapeReward(load_classifier(settings.options.classifier))


@register("toyworld_area", section=OPTIONS)
def build_area(settings: RewardSettings) -> AreaReward:
    options = settings.options
    return AreaReward(options.area_target, options.colour_temperature)


@register("toyworld_position", section=OPTIONS)
def build_position(settings: RewardSettings) -> PositionReward:
    options = settings.options
    return PositionReward(tuple(float(v) for v in options.position_target), options.colour_temperature)
