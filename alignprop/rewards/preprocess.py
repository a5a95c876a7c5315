"""Differentiable image preprocessing shared by the CLIP-based rewards, in two modes (`rewards.preprocess`).

"processor": what the reward models were trained with, their PIL-based processors (transformers'
CLIPImageProcessor, open_clip's transform): resize the shortest side to the model's size with bicubic
filtering, centre-crop, scale to [0, 1], normalise by the model's mean/std. We do the same with torch ops
so the reward's gradient reaches the pixels. Differences from PIL come from PIL's 8-bit intermediate image
and are small (tests/rewards/test_preprocess.py states the tolerance).

"original": what the original AlignProp code fed its aesthetic and HPS models, torchvision 0.15's
`Resize(224)` on the image tensor (shortest side, bilinear, no antialiasing, no crop) and the mean/std.
Without antialiasing a 512 -> 224 resize reads only the 2x2 pixels around each sample point, so the
gradient reaches a fraction of the pixels; the paper's presets use it because the paper trained with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignprop.errors import UserError
from alignprop.rewards.images import to_unit_range

# The OpenAI CLIP training statistics; open_clip and most CLIP checkpoints on the hub use them too.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageSpec:
    """What a reward model expects: shortest side `resize` pixels, then a `crop` (height, width) centre crop.

    `crop_offset` is how an odd excess is split: "floor" as transformers' processors do, "round" (half to
    even) as torchvision's CenterCrop in open_clip's transform does; they differ by one pixel.
    `mode` "original" resizes as the original AlignProp code did instead (see the module docstring).
    """

    resize: int
    crop: tuple[int, int]
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    crop_offset: str = "floor"
    mode: str = "processor"


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (height, width) when the shortest side becomes `size`; the long side is truncated to int,
    as torchvision's Resize and transformers' processors do."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_shortest_side(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize with antialiasing (torch's antialiased bicubic uses PIL's filter, a = -0.5)."""
    height, width = shortest_side_size(pixels.shape[-2], pixels.shape[-1], size)
    if (height, width) == tuple(pixels.shape[-2:]):
        return pixels
    resized = F.interpolate(pixels, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    # PIL works on 8-bit images, so its bicubic overshoot at edges saturates; match it.
    return resized.clamp(0, 1)


def resize_like_original(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision 0.15's `Resize(size)` on a tensor: shortest side to `size`, bilinear, no antialiasing."""
    height, width = shortest_side_size(pixels.shape[-2], pixels.shape[-1], size)
    return F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=False, align_corners=False)


def center_crop(pixels: torch.Tensor, height: int, width: int, offset: str = "floor") -> torch.Tensor:
    excess_h, excess_w = pixels.shape[-2] - height, pixels.shape[-1] - width
    if excess_h < 0 or excess_w < 0:
        raise ValueError(f"cannot crop {tuple(pixels.shape[-2:])} to ({height}, {width})")
    if offset == "floor":
        top, left = excess_h // 2, excess_w // 2
    else:
        top, left = int(round(excess_h / 2)), int(round(excess_w / 2))
    return pixels[..., top : top + height, left : left + width]


def normalize(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    mean_t = torch.tensor(mean, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
    return (pixels - mean_t) / std_t


def prepare(images: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, H, W) -> the model's normalised input, float32, differentiable."""
    if spec.mode == "original":
        pixels = resize_like_original(to_unit_range(images), spec.resize)
        if tuple(pixels.shape[-2:]) != spec.crop:  # the original never cropped: only square images fit the model
            raise UserError(
                f"rewards.preprocess='original' resizes {tuple(images.shape[-2:])} images to "
                f"{tuple(pixels.shape[-2:])} without cropping, but the reward model takes {spec.crop}; "
                "use square images or rewards.preprocess='processor'"
            )
    else:
        pixels = resize_shortest_side(to_unit_range(images), spec.resize)
        pixels = center_crop(pixels, *spec.crop, offset=spec.crop_offset)
    return normalize(pixels, spec.mean, spec.std)
