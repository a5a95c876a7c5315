import torch

from alignprop.toyworld import checker
from alignprop.toyworld.augment import blur
from alignprop.toyworld.captions import Request, parse


def requests(data):
    return [parse(c) for c in data.captions]


def test_checker_reads_rendered_images(rendered):
    verdict = checker.check(rendered.images)
    accuracy = checker.accuracy(verdict, requests(rendered))
    assert accuracy["background"] == 1.0 and accuracy["colour"] == 1.0
    assert accuracy["shape"] >= 0.99  # measured: 1.0 on 2000 scenes
    areas = torch.tensor([s.area for s in rendered.scenes])
    centroids = torch.tensor([[s.cx, s.cy] for s in rendered.scenes]) / 32
    assert (verdict.area - areas).abs().max() < 0.02
    assert (verdict.centroid - centroids).abs().max() < 0.02


def test_checker_tolerates_blur_and_noise(rendered):
    generator = torch.Generator().manual_seed(0)
    images = blur(rendered.images, torch.full((len(rendered),), 0.8))
    images = images + 0.08 * torch.randn(images.shape, generator=generator)
    assert checker.accuracy(checker.check(images), requests(rendered))["prompt"] >= 0.97


def test_checker_rejects_wrong_prompts(rendered):
    verdict = checker.check(rendered.images[:30])
    wrong = [Request(shape=r.shape, colour=r.background, background=r.colour) for r in requests(rendered)[:30]]
    right = checker.correctness(verdict, wrong)
    assert not right["background"].any() and not right["colour"].any() and not right["prompt"].any()


def test_checker_finds_no_shape_in_a_plain_image():
    plain = torch.zeros(1, 3, 32, 32)
    plain[:, 0] = 0.7  # one flat colour
    verdict = checker.check(plain)
    assert verdict.shape == [None] and verdict.colour == [None] and verdict.area.item() == 0
