"""Rendered training data and the small helpers every toy-world training script shares."""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alignprop.toyworld.captions import scene_caption
from alignprop.toyworld.render import render_batches
from alignprop.toyworld.world import Scene, random_scenes


@dataclass
class Dataset:
    scenes: list[Scene]
    images: torch.Tensor  # (N, 3, 32, 32) in [-1, 1]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.scenes)


def rendered_dataset(count: int, seed: int) -> Dataset:
    """`count` random scenes drawn from `seed`, their images and captions."""
    scenes = random_scenes(count, seed)
    return Dataset(scenes, render_batches(scenes), [scene_caption(s) for s in scenes])


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int, final_fraction: float = 0.1):
    """Linear warm-up, then cosine decay to `final_fraction` of the learning rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (reconstruction.clamp(-1, 1) - target).pow(2).mean().item()
    return 10 * math.log10(4 / max(mse, 1e-12))


def denoiser_training_arguments(
    description: str, out: Path, log: Path, steps: int, batch_size: int
) -> argparse.ArgumentParser:
    """The command line train_unet.py and train_flow.py share (their own defaults for the paths and the length)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--log", type=Path, default=log)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-images", type=int, default=32768)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--control-repeats", type=int, default=4, help="images per caption in the final check")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


class RunLog:
    """Progress records as JSON lines in a file (and the logger), each with the seconds since start."""

    def __init__(self, path: Path):
        self.path, self.started = path, time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self, **record) -> None:
        record = {"seconds": round(self.elapsed(), 1), **record}
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        logging.getLogger("alignprop.toyworld").info(json.dumps(record))
