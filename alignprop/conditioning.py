"""Prompt conditioning: what the denoiser needs besides the latents and the timestep.

A model family (`alignprop.families`) encodes prompts into a `Conditioning`: keyword arguments of its
denoiser call, per sample (batched, possibly nested as SDXL's `added_cond_kwargs`) and shared by the whole
batch. The sampler only asks for the keyword arguments of one call, guided ([uncond; cond]) or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Kwargs = dict  # name -> tensor, or a nested dict of them (SDXL's added_cond_kwargs)


def _concat(first: Kwargs, second: Kwargs) -> Kwargs:
    """Concatenate two keyword-argument trees along the batch dimension, key by key."""
    return {
        key: _concat(value, second[key]) if isinstance(value, dict) else torch.cat([value, second[key]])
        for key, value in first.items()
    }


@dataclass
class Conditioning:
    """The denoiser's prompt inputs for a batch: conditional, unconditional (for guidance) and shared ones."""

    cond: Kwargs
    uncond: Kwargs | None = None  # None: the family or the call needs no unconditional branch
    shared: Kwargs = field(default_factory=dict)  # the same for every sample (not concatenated)
    batch_size: int = 0

    def __len__(self) -> int:
        return self.batch_size

    def guided_kwargs(self) -> Kwargs:
        """Keyword arguments for one batched call over [uncond; cond]."""
        return {**_concat(self.uncond, self.cond), **self.shared}

    def kwargs(self, which: str) -> Kwargs:
        """Keyword arguments for a single call on `which` in {"cond", "uncond"}."""
        return {**getattr(self, which), **self.shared}
