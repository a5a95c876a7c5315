"""Scenes -> pixels, deterministically: anti-aliased by supersampling, vectorised over the batch.

`coverage` (the fraction of each pixel inside the shape) is also used by the checker, which compares a
generated image's foreground with the ideal shape of the same area and centroid.
"""

from __future__ import annotations

import torch

from alignprop.toyworld.world import IMAGE_SIZE, PALETTE, SHAPES, Scene, shape_extent

SUPERSAMPLE = 4  # sub-pixel samples per axis
# Outward unit normals of an upward-pointing equilateral triangle's edges (y down); each edge lies at
# the inradius (half the circumradius) from the centroid.
TRIANGLE_NORMALS = torch.tensor([[0.0, 1.0], [-(3**0.5) / 2, -0.5], [3**0.5 / 2, -0.5]])


def _sample_points() -> torch.Tensor:
    """Sub-pixel sample coordinates along one axis, (IMAGE_SIZE * SUPERSAMPLE,) in pixel units."""
    return (torch.arange(IMAGE_SIZE * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE


def _inside(shape: str, dx: torch.Tensor, dy: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """Boolean (N, H', W') inside-test for one shape kind; dx/dy are offsets from the centroids."""
    extent = torch.tensor([shape_extent(shape, a) for a in area.tolist()]).view(-1, 3, 1, 1)
    if shape == "circle":
        return dx**2 + dy**2 <= extent[:, 0] ** 2
    if shape == "square":
        return (dx.abs() <= extent[:, 0]) & (dy.abs() <= extent[:, 0])
    inradius = extent[:, 2]  # the extent below the centroid
    inside = torch.ones_like(dx, dtype=torch.bool)
    for nx, ny in TRIANGLE_NORMALS.tolist():
        inside &= nx * dx + ny * dy <= inradius
    return inside


def coverage(shapes: list[str], area: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Fraction of every pixel covered by each shape: (N, IMAGE_SIZE, IMAGE_SIZE) in [0, 1].

    `area` is a fraction of the image; (cx, cy) the centroid in pixels.
    """
    points = _sample_points()
    dx = points.view(1, 1, -1) - cx.view(-1, 1, 1)
    dy = points.view(1, -1, 1) - cy.view(-1, 1, 1)
    dx, dy = torch.broadcast_tensors(dx, dy)
    inside = torch.zeros(dx.shape, dtype=torch.bool)
    for kind in SHAPES:
        rows = [i for i, shape in enumerate(shapes) if shape == kind]
        if rows:
            inside[rows] = _inside(kind, dx[rows], dy[rows], area[rows])
    fine = inside.float().unsqueeze(1)
    return torch.nn.functional.avg_pool2d(fine, SUPERSAMPLE).squeeze(1)


def scene_colours(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """(shape colours, background colours), each (N, 3) in 0..255 with each scene's jitter applied."""
    shape = torch.tensor([[p + s for p, s in zip(PALETTE[x.colour], x.colour_shift)] for x in scenes])
    background = torch.tensor([[p + s for p, s in zip(PALETTE[x.background], x.background_shift)] for x in scenes])
    return shape.clamp(0, 255), background.clamp(0, 255)


def render(scenes: list[Scene]) -> torch.Tensor:
    """Images (N, 3, 32, 32) float32 in [-1, 1], the project's image convention."""
    cover = coverage(
        [s.shape for s in scenes],
        torch.tensor([s.area for s in scenes]),
        torch.tensor([s.cx for s in scenes]),
        torch.tensor([s.cy for s in scenes]),
    ).unsqueeze(1)
    shape, background = scene_colours(scenes)
    pixels = background.view(-1, 3, 1, 1) * (1 - cover) + shape.view(-1, 3, 1, 1) * cover
    return pixels / 127.5 - 1


def render_batches(scenes: list[Scene], batch_size: int = 1024) -> torch.Tensor:
    """`render` in chunks, to bound the memory of the supersampled grid."""
    return torch.cat([render(scenes[i : i + batch_size]) for i in range(0, len(scenes), batch_size)])
