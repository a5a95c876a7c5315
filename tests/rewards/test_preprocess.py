"""The torch preprocessing against the models' own PIL-based processors.

Tolerance: PIL resizes an 8-bit image and rounds the result to 8 bits; we keep floats. The difference is
at most one grey level: 1/255 / std ~ 0.015 in normalised units. We allow max 0.02 and mean 0.006.
"""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from alignprop.rewards.preprocess import ImageSpec, center_crop, prepare, shortest_side_size

MAX_DIFF, MEAN_DIFF = 0.02, 0.006
SHAPES = [(512, 512), (384, 512), (512, 384), (333, 517), (150, 200)]  # odd crop excess; upsampling


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A uint8 HxWx3 image with what photos have: smooth gradients, fine texture, hard-edged shapes, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([0.6 * x + 0.2, 0.5 - 0.3 * y + 0.2 * np.sin(6 * x), 0.3 + 0.4 * x * y], axis=-1)
    image += 0.08 * np.sin(40 * x + 25 * y)[..., None]
    image[(x - 0.3) ** 2 + (y - 0.35) ** 2 < 0.12**2] = [0.9, 0.8, 0.1]
    image[int(0.5 * height) : int(0.7 * height), int(0.6 * width) : int(0.9 * width)] = [0.1, 0.2, 0.7]
    image += rng.normal(0, 0.02, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def as_model_input(array: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float NCHW in [-1, 1], the sampler's convention."""
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 127.5 - 1


def assert_close_to_pil(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    difference = (ours - reference).abs()
    assert difference.max() <= MAX_DIFF and difference.mean() <= MEAN_DIFF, (
        difference.max(),
        difference.mean(),
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_transformers_clip_image_processor(shape):
    array = photo_like(*shape)
    reference = CLIPImageProcessorPil()(Image.fromarray(array), return_tensors="pt")["pixel_values"]
    assert_close_to_pil(prepare(as_model_input(array), ImageSpec(224, (224, 224))), reference)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_open_clip_transform(shape):
    array = photo_like(*shape)
    reference = open_clip.image_transform(224, is_train=False)(Image.fromarray(array))[None]
    ours = prepare(as_model_input(array), ImageSpec(224, (224, 224), crop_offset="round"))
    assert_close_to_pil(ours, reference)


def test_crop_offsets_differ_only_for_odd_excess():
    pixels = torch.arange(7.0).view(1, 1, 1, 7)
    assert center_crop(pixels, 1, 4, "floor").flatten().tolist() == [1, 2, 3, 4]
    assert center_crop(pixels, 1, 4, "round").flatten().tolist() == [2, 3, 4, 5]  # round(1.5) = 2
    assert center_crop(pixels, 1, 5, "floor").equal(center_crop(pixels, 1, 5, "round"))


def test_shortest_side_sizes_follow_torchvision():
    assert shortest_side_size(512, 512, 224) == (224, 224)
    assert shortest_side_size(333, 517, 224) == (224, 347)  # int(224 * 517 / 333) = 347
    assert shortest_side_size(517, 333, 224) == (347, 224)


def test_gradient_reaches_every_pixel_that_survives_the_crop():
    images = (torch.rand(2, 3, 64, 80) * 1.6 - 0.8).requires_grad_(True)  # away from the clamp
    prepare(images, ImageSpec(32, (32, 32))).sum().backward()
    assert images.grad.abs().sum() > 0
    central = images.grad[..., :, 8:72]  # 64x80 -> 32x40 -> crop columns 4..36, i.e. input 8..72
    assert (central.abs().sum(dim=(0, 1, 2)) > 0).all()
