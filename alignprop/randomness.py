"""Every random stream a run draws from, and their states as plain tensors and tuples (for checkpoints).

Training draws only from `RandomStreams` (explicit generators seeded from the seed and process index); the
global torch / numpy / python generators are saved as well, so nothing that reaches for them (a library,
a future reward) can make a resumed run diverge.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class RandomStreams:
    """Every random draw of training comes from these, seeded from (seed, process index); `shared_plans`: the
    gradient paths' plans from one stream alike on every process (sharding=fsdp: every process must make the same
    denoiser calls)."""

    prompts: random.Random
    latents: torch.Generator
    plans: torch.Generator

    @classmethod
    def seeded(cls, seed: int, process_index: int, shared_plans: bool = False) -> RandomStreams:
        base = seed * 1_000_003 + process_index * 7_919
        plans_base = seed * 1_000_003 if shared_plans else base
        return cls(
            prompts=random.Random(base),
            latents=torch.Generator().manual_seed(base + 1),
            plans=torch.Generator().manual_seed(plans_base + 2),
        )

    def state_dict(self) -> dict:
        return {
            "prompts": self.prompts.getstate(),
            "latents": self.latents.get_state(),
            "plans": self.plans.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.prompts.setstate(state["prompts"])
        self.latents.set_state(state["latents"])
        self.plans.set_state(state["plans"])


def global_state() -> dict:
    """The process-wide generators (python, numpy, torch CPU and CUDA)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        # numpy's state holds an ndarray; stored as a tensor so the file loads with torch.load(weights_only=True).
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["name"], keys, numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_global_state():
    """Run a block (e.g. an evaluation) without moving the global generators: training then draws the same
    numbers whether or not, and wherever, evaluations happen (needed for an exact resume)."""
    state = global_state()
    try:
        yield
    finally:
        set_global_state(state)
