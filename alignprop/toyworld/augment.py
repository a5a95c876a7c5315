"""Image perturbations for training the shape classifier, so it tolerates what generated images look like
(soft edges, slight noise, shifted shades) without ever seeing one."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (3x3 kernel) with standard deviations `sigma` (N,) in pixels."""
    offsets = torch.tensor([-1.0, 0.0, 1.0])
    weights = torch.exp(-(offsets.view(1, 3) ** 2) / (2 * sigma.clamp_min(1e-3).view(-1, 1) ** 2))
    weights = weights / weights.sum(dim=1, keepdim=True)
    kernels = weights[:, :, None] * weights[:, None, :]  # (N, 3, 3)
    n, c, h, w = images.shape
    padded = F.pad(images.reshape(1, n * c, h, w), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernels.repeat_interleave(c, dim=0).unsqueeze(1), groups=n * c).view(n, c, h, w)


def perturb(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, channel order, contrast, brightness and noise; shapes are unchanged."""
    n = len(images)
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    images = blur(images, rand(n) * 1.2)
    order = torch.stack([torch.randperm(3, generator=generator) for _ in range(n)])
    images = torch.gather(images, 1, order.view(n, 3, 1, 1).expand_as(images))  # colour-blind to shape
    images = images * (0.7 + 0.6 * rand(n, 1, 1, 1)) + 0.3 * (rand(n, 3, 1, 1) - 0.5)
    images = images + 0.08 * rand(n, 1, 1, 1) * torch.randn(images.shape, generator=generator)
    return images.clamp(-1, 1)
