"""Prompt conditioning: what the denoiser needs besides the latents and the timestep.

A model family (`alignprop.families`) encodes prompts into a `Conditioning`: keyword arguments of its
denoiser call, per sample (batched, possibly nested as SDXL's `added_cond_kwargs`) and shared by the whole
batch. The sampler only asks for the keyword arguments of one call, guided ([uncond; cond]) or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Kwargs = dict  # name -> tensor, or a nested dict of them (SDXL's added_cond_kwargs)


def _concat(*trees: Kwargs) -> Kwargs:
    """Concatenate keyword-argument trees along the batch dimension, key by key."""
    return {
        key: _concat(*(tree[key] for tree in trees)) if isinstance(value, dict) else torch.cat([t[key] for t in trees])
        for key, value in trees[0].items()
    }


def _rows(tree: Kwargs, index: torch.Tensor | slice) -> Kwargs:
    """The samples `index` (a tensor of indices, or a slice: then views) of a keyword-argument tree."""
    if isinstance(index, torch.Tensor):
        return {
            key: _rows(value, index) if isinstance(value, dict) else value[index.to(value.device)]
            for key, value in tree.items()
        }
    return {key: _rows(value, index) if isinstance(value, dict) else value[index] for key, value in tree.items()}


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

    def rows(self, index: torch.Tensor | slice) -> Conditioning:
        """The samples `index` (a tensor of indices, or a slice: then views) of this batch."""
        size = len(range(self.batch_size)[index]) if isinstance(index, slice) else len(index)
        uncond = None if self.uncond is None else _rows(self.uncond, index)
        return Conditioning(_rows(self.cond, index), uncond, self.shared, size)

    def samples(self) -> list[Conditioning]:
        """One conditioning per sample (for a prompt cache)."""
        return [self.rows(slice(i, i + 1)) for i in range(self.batch_size)]

    @classmethod
    def join(cls, parts: list[Conditioning], guided: bool) -> Conditioning:
        """The batch of `parts` (per-sample conditionings with the same shared arguments)."""
        return cls(
            cond=_concat(*(part.cond for part in parts)),
            uncond=_concat(*(part.uncond for part in parts)) if guided else None,
            shared=parts[0].shared,
            batch_size=len(parts),
        )
