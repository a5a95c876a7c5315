"""What a toy-world scene is, and how scenes are drawn at random from a seed.

A scene is one shape of one colour on a plain background of another colour. Besides the three named
attributes (which the caption states) a scene has a size and a position, which the caption leaves free:
they are what the geometry rewards push on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
# Palette colours (0..255) far apart in RGB, so the nearest palette colour names a pixel unambiguously.
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 190),
    "white": (235, 235, 235),
}
COLOURS = tuple(PALETTE)
AREA_RANGE = (0.06, 0.22)  # shape area as a fraction of the image
COLOUR_JITTER = 12  # per-channel shade variation (0..255 units), so colours are families, not points
MARGIN = 1.0  # pixels kept free between the shape and the image border


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    area: float  # fraction of the image the shape covers
    cx: float  # centroid, in pixels (x right, y down)
    cy: float
    colour_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)  # jitter of the shape colour, 0..255 units
    background_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)


def shape_extent(shape: str, area: float, size: int = IMAGE_SIZE) -> tuple[float, float, float]:
    """(half width, extent above the centroid, extent below it) in pixels for a shape of `area`."""
    pixels = area * size * size
    if shape == "circle":
        radius = (pixels / torch.pi) ** 0.5
        return radius, radius, radius
    if shape == "square":
        half = pixels**0.5 / 2
        return half, half, half
    if shape == "triangle":  # equilateral, pointing up, centroid at (cx, cy)
        side = (4 * pixels / 3**0.5) ** 0.5
        circumradius = side / 3**0.5
        return side / 2, circumradius, circumradius / 2
    raise ValueError(f"unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _choice(generator: torch.Generator, options) -> str:
    return options[int(torch.randint(len(options), (), generator=generator))]


def random_scene(
    generator: torch.Generator, shape: str | None = None, colour: str | None = None, background: str | None = None
) -> Scene:
    """One scene; attributes left as None are drawn (the background never equals the shape colour)."""
    shape = shape or _choice(generator, SHAPES)
    colour = colour or _choice(generator, COLOURS)
    background = background or _choice(generator, [c for c in COLOURS if c != colour])
    if background == colour:
        raise ValueError(f"the background must differ from the shape colour ({colour!r})")
    area = _uniform(generator, *AREA_RANGE)
    half_width, above, below = shape_extent(shape, area)
    cx = _uniform(generator, half_width + MARGIN, IMAGE_SIZE - half_width - MARGIN)
    cy = _uniform(generator, above + MARGIN, IMAGE_SIZE - below - MARGIN)
    jitter = lambda: tuple(_uniform(generator, -COLOUR_JITTER, COLOUR_JITTER) for _ in range(3))  # noqa: E731
    return Scene(shape, colour, background, area, cx, cy, jitter(), jitter())


def random_scenes(count: int, seed: int) -> list[Scene]:
    """`count` scenes, the same for the same seed on every machine (CPU generator)."""
    generator = torch.Generator().manual_seed(seed)
    return [random_scene(generator) for _ in range(count)]


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) the world allows: 3 x 6 x 5 = 90."""
    return [(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if b != c]
