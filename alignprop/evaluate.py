"""Evaluation: generate on fixed latents without gradient and score.

One function, `generate_and_score` (spread over processes by `Evaluator`), serves the evaluation during
training, the evaluate preset and every point of a soup sweep. What gets written (one PNG per image, captioned
grids, a JSON summary, tracker logs) is `alignprop.report`'s, re-exported here.

The evaluation set (`eval_prompts`): "all" = every prompt of `eval_prompt_fn`, `eval_images_per_prompt` times;
"original" = the original code's, `train.batch_size_per_gpu_available x max_vis_images` prompts drawn once, at
random with replacement (a `random.Random(seed)`, the same on every process), all of them saved.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from alignprop.denoiser_files import is_denoiser_folder, load_denoiser_weights
from alignprop.families import Family
from alignprop.lora_files import add_adapter, read_lora
from alignprop.prompts import load_prompts
from alignprop.report import (  # noqa: F401 (re-exported: the files an evaluation writes)
    GRID_COLUMNS,
    SETTINGS,
    SLUG_LENGTH,
    image_file_name,
    log_to_trackers,
    save_before_after,
    save_grid,
    to_pil,
    write_evaluation,
)
from alignprop.rewards import Reward
from alignprop.sampling import SamplingOptions, generate_images, sampling_options_from_config, seeded_latents
from alignprop.session import Session, start_trackers


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
    progress: Callable[[int], object] | None = None,
    extra_rewards: dict[str, Reward] | None = None,
) -> EvalResult:
    """Sample prompts on seeded latents (same sampler as training, no gradient) and score them.

    Prompt i always gets latent i of the seeded draw, so a subset (`indices`, e.g. one process's share)
    produces exactly the images the full set would. `progress(n)` is called after every batch of n images.
    `extra_rewards` (name -> reward, `eval_reward_fns`): held-out rewards, each as the metric `heldout_<name>`.
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
        for name, extra in (extra_rewards or {}).items():
            metrics.setdefault(f"heldout_{name}", []).append(extra.score(batch_images, chunk).reward.float().cpu())
        if progress is not None:
            progress(len(chunk))
    return EvalResult(
        prompts=list(prompts),
        images=torch.cat(images),
        rewards=torch.cat(rewards),
        metrics={name: torch.cat(values) for name, values in metrics.items()},
    )


def evaluation_prompts(config) -> list[str]:
    """The evaluation set of `config.eval_prompts` (module docstring); each entry gets its own latent."""
    prompts = load_prompts(config.eval_prompt_fn)
    if config.eval_prompts == "original":
        count = config.train.batch_size_per_gpu_available * config.max_vis_images
        draw = random.Random(config.seed)
        return [draw.choice(prompts) for _ in range(count)]
    return prompts * config.eval_images_per_prompt


def saved_image_count(config) -> int | None:
    """Images kept of an evaluation during training: the first `max_vis_images`, or all of the original's set
    (which has batch_size_per_gpu_available x max_vis_images images; the original saved every one)."""
    return None if config.eval_prompts == "original" else config.max_vis_images


class Evaluator:
    """Evaluates whatever LoRA the model's denoiser holds; each process does a share, all get the result.
    The main process shows a progress bar (images of its share) labelled `label`. `lockstep`: every process samples
    the same number of images (a shorter share repeats its last prompt, dropped after), so all make the same
    denoiser calls (sharding=fsdp: each call all-gathers the sharded weights together)."""

    def __init__(
        self,
        accelerator,
        model: Family,
        reward: Reward,
        prompts: list[str],
        options,
        batch_size: int,
        extra_rewards: dict[str, Reward] | None = None,  # held-out rewards (eval_reward_fns)
        lockstep: bool = False,
    ):
        self.accelerator, self.model, self.reward = accelerator, model, reward
        self.prompts, self.options, self.batch_size = prompts, options, batch_size
        self.label = "evaluate"
        self.extra_rewards = extra_rewards or {}
        self.lockstep = lockstep

    def __call__(self, seed: int) -> EvalResult:
        rank, count = self.accelerator.process_index, self.accelerator.num_processes
        indices = list(range(len(self.prompts)))[rank::count]
        share = indices
        if self.lockstep:
            longest = -(-len(self.prompts) // count)
            share = indices + [indices[-1] if indices else 0] * (longest - len(indices))
        mine = None
        if share:
            quiet = not self.accelerator.is_main_process
            with tqdm(total=len(share), desc=self.label, unit="image", leave=False, disable=quiet) as bar:
                mine = generate_and_score(
                    self.model,
                    self.reward,
                    self.prompts,
                    self.options,
                    self.batch_size,
                    seed,
                    share,
                    bar.update,
                    self.extra_rewards,
                ).head(len(indices))
        return EvalResult.merge(gather_object([(indices, mine)]))


def evaluator_for(session: Session, config, batch_size: int, lockstep: bool = False) -> Evaluator:
    """The evaluation of `config` (its eval prompts and sampling options) on a session's model and reward."""
    options = sampling_options_from_config(config)
    prompts = evaluation_prompts(config)
    return Evaluator(
        session.accelerator, session.model, session.reward, prompts, options, batch_size, session.eval_rewards, lockstep
    )


# --- the evaluate preset ----------------------------------------------------------------------------


def evaluation_context(config, weights: str | None, mode: str) -> dict:
    """What summary.json says was evaluated (`lora`: the LoRA file or denoiser folder; None: the base model)."""
    return {
        "mode": mode,
        "lora": weights,
        "model": config.pretrained.model,
        "reward_fn": config.reward_fn,
        "prompts": config.eval_prompt_fn,
        "seed": config.seed,
        "eval_seeding": config.get("eval_seeding", "sequential"),  # "sequential": latent i of one draw from seed
        "steps": config.steps,
        "guidance_scale": config.sd_guidance_scale,
        "eta": config.eta,
    }


def load_trained(denoiser, weights: Path) -> None:
    """A LoRA file added as an adapter, or a full fine-tuning's denoiser folder copied over the base weights."""
    if is_denoiser_folder(weights):
        load_denoiser_weights(denoiser, weights)
    else:
        add_adapter(denoiser, read_lora(weights), adapter_name="default")


def run_evaluation(session: Session, config, batch_size: int, run_dir: Path, weights: Path | None) -> EvalResult:
    """Evaluate trained weights (a LoRA file or a denoiser folder; the base model for None) and write
    run_dir/{images/, grid.png, summary.json}."""
    evaluator = evaluator_for(session, config, batch_size)
    start_trackers(session, config, run_dir)
    if weights is not None:
        load_trained(session.model.denoiser, weights)
    result = evaluator(config.seed)
    accelerator = evaluator.accelerator
    if accelerator.is_main_process:
        context = evaluation_context(config, None if weights is None else str(weights), "evaluate")
        summary = write_evaluation(result, run_dir, context)
        log_to_trackers(accelerator, "eval", summary, run_dir / "grid.png", step=0)
    accelerator.end_training()
    return result
