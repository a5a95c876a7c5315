"""The ground-truth checker: what a generated image shows, read from its pixels by plain geometry.

Not differentiable and not learned, so it cannot be hacked the way a reward can:

1. background: the median colour of the border ring, named by the nearest palette colour;
2. shape colour: the most common palette colour among "pure" pixels (close to some palette colour, so
   anti-aliased edge mixtures do not vote) that are not the background's;
3. a soft foreground mask: each pixel's position on the line from the background colour to the shape
   colour, which for a rendered image is exactly the pixel's coverage;
4. area and centroid from that mask;
5. shape: the ideal circle, square and triangle of the same area and centroid are rendered, and the one
   overlapping the mask best (soft IoU) wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignprop.toyworld.captions import Request
from alignprop.toyworld.render import coverage
from alignprop.toyworld.world import COLOURS, IMAGE_SIZE, PALETTE, SHAPES

PALETTE_RGB = torch.tensor([PALETTE[name] for name in COLOURS], dtype=torch.float32)
PURE_DISTANCE = 50.0  # RGB distance (0..255) within which a pixel counts as a palette colour
MIN_SHAPE_PIXELS = 8  # fewer pure shape-coloured pixels than this: no shape
MIN_AREA = 0.01  # a foreground smaller than this fraction of the image is not a shape
NOISE_FLOOR = 0.2  # mask values within this of 0 or 1 are snapped to 0 or 1


@dataclass
class Verdict:
    """What the checker sees in a batch of images (names are None where nothing was found)."""

    background: list[str]
    colour: list[str | None]
    shape: list[str | None]
    area: torch.Tensor  # (N,) fraction of the image
    centroid: torch.Tensor  # (N, 2) x, y in [0, 1]


def to_rgb255(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW -> 0..255 float NHWC."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).cpu()


def nearest_palette(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest palette colour, distance to it) for pixels (..., 3) in 0..255."""
    distances = torch.cdist(pixels.reshape(-1, 3), PALETTE_RGB)
    distance, index = distances.min(dim=1)
    return index.view(pixels.shape[:-1]), distance.view(pixels.shape[:-1])


def border(rgb: torch.Tensor) -> torch.Tensor:
    """The outermost ring of pixels, (N, ring, 3)."""
    top, bottom = rgb[:, 0], rgb[:, -1]
    left, right = rgb[:, 1:-1, 0], rgb[:, 1:-1, -1]
    return torch.cat([top, bottom, left, right], dim=1)


def soft_mask(rgb: torch.Tensor, background: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Each pixel's fraction of the way from the background colour to the shape colour, (H, W) in [0, 1]."""
    direction = foreground - background
    fraction = (rgb - background) @ direction / direction.dot(direction).clamp_min(1.0)
    # Stretch [NOISE_FLOOR, 1 - NOISE_FLOOR] to [0, 1]: small deviations (noise, texture) are not shape.
    return ((fraction - NOISE_FLOOR) / (1 - 2 * NOISE_FLOOR)).clamp(0, 1)


def classify_shape(mask: torch.Tensor, area: float, cx: float, cy: float) -> str:
    """The ideal shape (same area and centroid) with the highest soft IoU against `mask`."""
    count = len(SHAPES)
    templates = coverage(list(SHAPES), torch.full((count,), area), torch.full((count,), cx), torch.full((count,), cy))
    overlap = torch.minimum(templates, mask).sum(dim=(1, 2)) / torch.maximum(templates, mask).sum(dim=(1, 2))
    return SHAPES[int(overlap.argmax())]


@dataclass
class Foreground:
    colour: str | None = None
    shape: str | None = None
    area: float = 0.0
    centroid: tuple[float, float] = (0.0, 0.0)  # x, y in [0, 1]


def read_foreground(rgb: torch.Tensor, labels: torch.Tensor, distances: torch.Tensor, background: int) -> Foreground:
    """Steps 2-5 for one image: `rgb` (H, W, 3), its palette labels and distances, the background's index."""
    pure_shape = (distances < PURE_DISTANCE) & (labels != background)
    if pure_shape.sum() < MIN_SHAPE_PIXELS:
        return Foreground()
    colour = int(labels[pure_shape].mode().values)
    shape_colour = rgb[pure_shape & (labels == colour)].median(dim=0).values
    mask = soft_mask(rgb, border(rgb[None])[0].median(dim=0).values, shape_colour)
    total = mask.sum().item()
    if total < MIN_AREA * mask.numel():
        return Foreground(colour=COLOURS[colour], area=total / mask.numel())
    centres = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    cx = (mask.sum(dim=0) * centres).sum().item() / total
    cy = (mask.sum(dim=1) * centres).sum().item() / total
    area = total / mask.numel()
    return Foreground(COLOURS[colour], classify_shape(mask, area, cx, cy), area, (cx / IMAGE_SIZE, cy / IMAGE_SIZE))


def check(images: torch.Tensor) -> Verdict:
    """Read background, shape colour, shape, area and centroid from images (N, 3, 32, 32) in [-1, 1]."""
    rgb = to_rgb255(images)
    labels, distances = nearest_palette(rgb)
    background, _ = nearest_palette(border(rgb).median(dim=1).values)
    found = [read_foreground(rgb[n], labels[n], distances[n], int(background[n])) for n in range(len(rgb))]
    return Verdict(
        background=[COLOURS[i] for i in background.tolist()],
        colour=[f.colour for f in found],
        shape=[f.shape for f in found],
        area=torch.tensor([f.area for f in found], dtype=torch.float32),
        centroid=torch.tensor([f.centroid for f in found], dtype=torch.float32).view(-1, 2),
    )


def correctness(verdict: Verdict, requests: list[Request]) -> dict[str, torch.Tensor]:
    """Per-image booleans: background, colour, shape, and all three together ("prompt")."""
    result = {
        attribute: torch.tensor(
            [getattr(verdict, attribute)[i] == getattr(r, attribute) for i, r in enumerate(requests)]
        )
        for attribute in ("background", "colour", "shape")
    }
    result["prompt"] = result["background"] & result["colour"] & result["shape"]
    return result


def accuracy(verdict: Verdict, requests: list[Request]) -> dict[str, float]:
    """Fraction of images right on each attribute, and on all three ("prompt")."""
    return {name: values.float().mean().item() for name, values in correctness(verdict, requests).items()}
