"""Evaluation: generate on fixed latents without gradient, score, and write what a person looks at.

One function, `generate_and_score` (spread over processes by `Evaluator`), serves the evaluation during
training, the evaluate preset and every point of a soup sweep. `write_evaluation` turns a result into
one PNG per image, a captioned grid and a JSON summary.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from PIL import Image, ImageDraw, ImageFont

from alignprop.families import Family
from alignprop.lora_files import add_adapter, read_lora
from alignprop.prompts import load_prompts
from alignprop.rewards import Reward
from alignprop.rundir import slugify
from alignprop.sampling import SamplingOptions, generate_images, sampling_options_from_config, seeded_latents
from alignprop.session import Session, start_trackers

SETTINGS = ("seed", "steps", "guidance_scale", "eta", "update", "num_images")  # in a summary, not a series
SLUG_LENGTH = 48  # characters of the prompt in an image's file name
GRID_COLUMNS = 8


@dataclass
class EvalResult:
    prompts: list[str]
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1], on the CPU
    rewards: torch.Tensor  # (N,)
    metrics: dict[str, torch.Tensor]  # name -> (N,)

    @classmethod
    def merge(cls, parts: list[tuple[list[int], EvalResult]]) -> EvalResult:
        """Reassemble results computed on disjoint index sets (one per process) in index order."""
        parts = [(indices, part) for indices, part in parts if indices]  # a process may have had no share
        order = [(i, part, k) for indices, part in parts for k, i in enumerate(indices)]
        order.sort(key=lambda item: item[0])
        pick = lambda tensor_of: torch.stack([tensor_of(part)[k] for _, part, k in order])  # noqa: E731
        names = parts[0][1].metrics.keys() if parts else []
        return cls(
            prompts=[part.prompts[k] for _, part, k in order],
            images=pick(lambda part: part.images),
            rewards=pick(lambda part: part.rewards),
            metrics={name: pick(lambda part, name=name: part.metrics[name]) for name in names},
        )

    def head(self, count: int | None) -> EvalResult:
        """The first `count` images (all of them for None)."""
        end = len(self.prompts) if count is None else count
        return EvalResult(
            self.prompts[:end], self.images[:end], self.rewards[:end], {k: v[:end] for k, v in self.metrics.items()}
        )

    def summary(self) -> dict[str, float]:
        """Reward mean/std and, for every other metric (e.g. each part of a combined reward), its mean and std."""
        summary = {"reward_mean": self.rewards.mean().item(), "reward_std": self.rewards.std(unbiased=False).item()}
        for name, values in self.metrics.items():
            summary[f"{name}_mean"] = values.float().mean().item()
            summary[f"{name}_std"] = values.float().std(unbiased=False).item()
        return summary


@torch.no_grad()
def generate_and_score(
    model: Family,
    reward: Reward,
    prompts: list[str],
    options: SamplingOptions,
    batch_size: int,
    seed: int,
    indices: list[int] | None = None,
) -> EvalResult:
    """Sample prompts on seeded latents (same sampler as training, no gradient) and score them.

    Prompt i always gets latent i of the seeded draw, so a subset (`indices`, e.g. one process's share)
    produces exactly the images the full set would.
    """
    latents = seeded_latents(len(prompts), model, seed)
    indices = list(range(len(prompts))) if indices is None else list(indices)
    prompts, latents = [prompts[i] for i in indices], latents[indices]
    images, rewards, metrics = [], [], {}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch_images = generate_images(model, chunk, latents[start : start + batch_size], options)
        result = reward.score(batch_images, chunk)
        images.append(batch_images.cpu())
        rewards.append(result.reward.float().cpu())
        for name, values in result.metrics.items():
            metrics.setdefault(name, []).append(values.float().cpu())
    return EvalResult(
        prompts=list(prompts),
        images=torch.cat(images),
        rewards=torch.cat(rewards),
        metrics={name: torch.cat(values) for name, values in metrics.items()},
    )


def evaluation_prompts(config) -> list[str]:
    """The eval prompt set, repeated `eval_images_per_prompt` times (each repeat gets its own latent)."""
    return load_prompts(config.eval_prompt_fn) * config.eval_images_per_prompt


class Evaluator:
    """Evaluates whatever LoRA the model's denoiser holds; each process does a share, all get the result."""

    def __init__(self, accelerator, model: Family, reward: Reward, prompts: list[str], options, batch_size: int):
        self.accelerator, self.model, self.reward = accelerator, model, reward
        self.prompts, self.options, self.batch_size = prompts, options, batch_size

    def __call__(self, seed: int) -> EvalResult:
        rank, count = self.accelerator.process_index, self.accelerator.num_processes
        indices = list(range(len(self.prompts)))[rank::count]
        mine = None
        if indices:
            mine = generate_and_score(
                self.model, self.reward, self.prompts, self.options, self.batch_size, seed, indices
            )
        return EvalResult.merge(gather_object([(indices, mine)]))


def evaluator_for(session: Session, config, batch_size: int) -> Evaluator:
    """The evaluation of `config` (its eval prompts and sampling options) on a session's model and reward."""
    options = sampling_options_from_config(config)
    prompts = evaluation_prompts(config)
    return Evaluator(session.accelerator, session.model, session.reward, prompts, options, batch_size)


# --- what gets written ------------------------------------------------------------------------------


def image_file_name(index: int, prompt: str) -> str:
    """Index (unique) + a short slug of the prompt (safe whatever the prompt holds)."""
    return f"{index:04d}_{slugify(prompt, max_length=SLUG_LENGTH)}.png"


def to_pil(image: torch.Tensor) -> Image.Image:
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def drawable(text: str, font) -> str:
    """PIL's bitmap fallback font only knows latin-1; FreeType fonts draw any text."""
    return text if isinstance(font, ImageFont.FreeTypeFont) else text.encode("latin-1", "replace").decode("latin-1")


def save_grid(rows: list[tuple[str, EvalResult]], path: Path, cell: int = 128, columns: int | None = None) -> None:
    """One row per result (e.g. "before", "after"), wrapped every `columns` images; captions: prompt | reward."""
    columns = columns or max(len(result.prompts) for _, result in rows)
    label_width = 70 if any(label for label, _ in rows) else 0
    caption_height = 28
    lines = [math.ceil(len(result.prompts) / columns) for _, result in rows]
    canvas = Image.new("RGB", (label_width + columns * cell, max(sum(lines), 1) * (cell + caption_height)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    first_line = 0
    for (label, result), line_count in zip(rows, lines):
        top = first_line * (cell + caption_height)
        draw.text((4, top + cell // 2), drawable(label, font), fill="black", font=font)
        for i, (image, prompt, reward) in enumerate(zip(result.images, result.prompts, result.rewards)):
            left = label_width + (i % columns) * cell
            cell_top = top + (i // columns) * (cell + caption_height)
            canvas.paste(to_pil(image).resize((cell, cell), Image.NEAREST), (left, cell_top))
            caption = f"{prompt[:18]}\n{reward.item():.3g}"
            draw.text((left + 2, cell_top + cell + 2), drawable(caption, font), fill="black", font=font)
        first_line += line_count
    canvas.save(path)


def write_evaluation(result: EvalResult, directory: Path, context: dict, max_images: int | None = None) -> dict:
    """directory/images/<index>_<slug>.png (the first `max_images`), grid.png and summary.json.

    Returns the summary (the statistics always cover every image, saved or not).
    """
    shown = result.head(max_images)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    files = []
    for index, (image, prompt) in enumerate(zip(shown.images, shown.prompts)):
        files.append(f"images/{image_file_name(index, prompt)}")
        to_pil(image).save(directory / files[-1])
    save_grid([("", shown)], directory / "grid.png", columns=min(GRID_COLUMNS, max(len(files), 1)))
    summary = {**context, "num_images": len(result.prompts), **result.summary()}
    per_image = []
    for index, prompt in enumerate(result.prompts):
        entry = {"index": index, "prompt": prompt, "file": files[index] if index < len(files) else None}
        entry["reward"] = result.rewards[index].item()
        entry.update({name: values[index].item() for name, values in result.metrics.items()})
        per_image.append(entry)
    (directory / "summary.json").write_text(json.dumps({**summary, "images": per_image}, indent=2) + "\n")
    return summary


def log_to_trackers(accelerator, prefix: str, summary: dict, grid: Path | None, step: int) -> None:
    """Scalars (numbers of the summary, not the settings: those are the logged config) and the grid image
    to every tracker (wandb, tensorboard)."""
    scalars = {
        f"{prefix}/{k}": v
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in SETTINGS
    }
    accelerator.log(scalars, step=step)
    if grid is None or not accelerator.is_main_process:
        return
    image = np.asarray(Image.open(grid).convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({f"{prefix}/grid": image[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({f"{prefix}/grid": [image]}, step=step)


# --- the evaluate preset ----------------------------------------------------------------------------


def evaluation_context(config, lora: str | None, mode: str) -> dict:
    return {
        "mode": mode,
        "lora": lora,
        "model": config.pretrained.model,
        "reward_fn": config.reward_fn,
        "prompts": config.eval_prompt_fn,
        "seed": config.seed,
        "steps": config.steps,
        "guidance_scale": config.sd_guidance_scale,
        "eta": config.eta,
    }


def run_evaluation(session: Session, config, batch_size: int, run_dir: Path, lora: Path | None) -> EvalResult:
    """Evaluate one LoRA (or the base model for None) and write run_dir/{images/, grid.png, summary.json}."""
    evaluator = evaluator_for(session, config, batch_size)
    start_trackers(session, config, run_dir)
    if lora is not None:
        add_adapter(session.model.denoiser, read_lora(lora), adapter_name="default")
    result = evaluator(config.seed)
    accelerator = evaluator.accelerator
    if accelerator.is_main_process:
        context = evaluation_context(config, None if lora is None else str(lora), "evaluate")
        summary = write_evaluation(result, run_dir, context)
        log_to_trackers(accelerator, "eval", summary, run_dir / "grid.png", step=0)
    accelerator.end_training()
    return result
