"""Evaluation: generate on fixed latents without gradient and score.

One function, `generate_and_score` (spread over processes by `Evaluator`), serves the evaluation during
training, the evaluate preset and every point of a soup sweep. What gets written (one PNG per image, captioned
grids, a JSON summary, tracker logs) is `alignprop.report`'s, re-exported here.

The evaluation set (`eval_prompts`): "all" = every prompt of `eval_prompt_fn`, `eval_images_per_prompt` times;
"original" = the original code's, `train.batch_size_per_gpu_available x max_vis_images` prompts drawn once, at
random with replacement, all of them saved: exactly the list its main process drew (`original_prompt_draw`).

Its latents (`eval_seeding`, `evaluation_latents`): "sequential" = entry k gets latent k of one CPU generator seeded
with `seed`; "per_prompt" = entry k gets its own CPU generator seeded with seed + k. The "all" set lists every prompt
once, then again for the second image, ...: entry k is image i = k // P of prompt p = k % P (P prompts), so its seed
is seed + p + i x P, FlowBP's (RuoyuWang-2077/FlowBP @ 93b220a, flowbp/eval/generation/sd35.py line 85 and
flowbp/eval/offline_ckpt_eval.py line 224: `seed + prompt_idx + img_idx * len(prompts)`, one generator per image).
A prompt's noise then depends only on its line in the file, whatever else is evaluated and however it is shared out.
Diversity numbers of the images (`alignprop.diversity`) come with every result that has their embeddings.
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
from alignprop.diversity import Embedder, diversity, embedder_for, encoder_name
from alignprop.families import Family
from alignprop.lora_files import add_adapter, read_lora
from alignprop.prompts import configured_prompts
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
from alignprop.sampling import (
    SamplingOptions,
    generate_images,
    initial_latents,
    sampling_options_from_config,
    seeded_latents,
)
from alignprop.session import Session, start_trackers


@dataclass
class EvalResult:
    prompts: list[str]
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1], on the CPU
    rewards: torch.Tensor  # (N,)
    metrics: dict[str, torch.Tensor]  # name -> (N,)
    embeddings: torch.Tensor | None = None  # (N, D) image embeddings of the diversity encoder; None: not computed

    @classmethod
    def merge(cls, parts: list[tuple[list[int], EvalResult]]) -> EvalResult:
        """Reassemble results computed on disjoint index sets (one per process) in index order."""
        parts = [(indices, part) for indices, part in parts if indices]  # a process may have had no share
        order = [(i, part, k) for indices, part in parts for k, i in enumerate(indices)]
        order.sort(key=lambda item: item[0])
        pick = lambda tensor_of: torch.stack([tensor_of(part)[k] for _, part, k in order])  # noqa: E731
        names = parts[0][1].metrics.keys() if parts else []
        embedded = bool(parts) and parts[0][1].embeddings is not None
        return cls(
            prompts=[part.prompts[k] for _, part, k in order],
            images=pick(lambda part: part.images),
            rewards=pick(lambda part: part.rewards),
            metrics={name: pick(lambda part, name=name: part.metrics[name]) for name in names},
            embeddings=pick(lambda part: part.embeddings) if embedded else None,
        )

    def head(self, count: int | None) -> EvalResult:
        """The first `count` images (all of them for None)."""
        end = len(self.prompts) if count is None else count
        embeddings = None if self.embeddings is None else self.embeddings[:end]
        return EvalResult(
            self.prompts[:end],
            self.images[:end],
            self.rewards[:end],
            {k: v[:end] for k, v in self.metrics.items()},
            embeddings,
        )

    def summary(self) -> dict[str, float]:
        """Reward mean/std and, for every other metric (e.g. each part of a combined reward), its mean and std; the
        diversity numbers when the images were embedded (`alignprop.diversity`)."""
        summary = {"reward_mean": self.rewards.mean().item(), "reward_std": self.rewards.std(unbiased=False).item()}
        if len(self.rewards) > 1:  # the original's eval_rewards_std: unbiased (7f4503f, main.py, lines 550, 574)
            summary["eval_rewards_std"] = self.rewards.std().item()
        for name, values in self.metrics.items():
            summary[f"{name}_mean"] = values.float().mean().item()
            summary[f"{name}_std"] = values.float().std(unbiased=False).item()
        if self.embeddings is not None:
            summary.update(diversity(self.embeddings, self.prompts))
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
    seeding: str = "sequential",
    embed: Embedder | None = None,
) -> EvalResult:
    """Sample prompts on seeded latents (same sampler as training, no gradient) and score them.

    Entry i always gets latent i of `evaluation_latents(seeding)`, so a subset (`indices`, e.g. one process's
    share) produces exactly the images the full set would. `progress(n)` is called after every batch of n images.
    `extra_rewards` (name -> reward, `eval_reward_fns`): held-out rewards, each as the metric `heldout_<name>`.
    `embed`: the diversity encoder, whose image embeddings the result keeps.
    """
    indices = list(range(len(prompts))) if indices is None else list(indices)
    latents = evaluation_latents(len(prompts), indices, model, seed, seeding)
    prompts = [prompts[i] for i in indices]
    images, rewards, metrics, embeddings = [], [], {}, []
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
        if embed is not None:
            embeddings.append(embed(batch_images).float().cpu())
        if progress is not None:
            progress(len(chunk))
    return EvalResult(
        prompts=list(prompts),
        images=torch.cat(images),
        rewards=torch.cat(rewards),
        metrics={name: torch.cat(values) for name, values in metrics.items()},
        embeddings=torch.cat(embeddings) if embed is not None else None,
    )


def evaluation_latents(count: int, indices: list[int], model: Family, seed: int, seeding: str) -> torch.Tensor:
    """The latents of entries `indices` of an evaluation set of `count` (module docstring: `eval_seeding`)."""
    if seeding == "per_prompt":
        draws = [initial_latents(1, model, torch.Generator().manual_seed(seed + index)) for index in indices]
        return torch.cat(draws) if draws else seeded_latents(0, model, seed)
    return seeded_latents(count, model, seed)[indices]


def evaluation_prompts(config) -> list[str]:
    """The evaluation set of `config.eval_prompts` (module docstring); each entry gets its own latent."""
    prompts = configured_prompts(config, config.eval_prompt_fn)
    if config.eval_prompts == "original":
        count = config.train.batch_size_per_gpu_available * config.max_vis_images
        return original_prompt_draw(prompts, config.seed, count)
    return prompts * config.eval_images_per_prompt


def original_prompt_draw(lines: list[str], seed: int, count: int, process_index: int = 0) -> list[str]:
    """The original's evaluation prompts on process `process_index`: `set_seed(seed, device_specific=True)` seeded
    Python's `random` with seed + process index, nothing drew from it before, then `count` draws of
    `random.choice` over the file's lines (mihirp1998/AlignProp @ 7f4503f, main.py, lines 200 and 383-385;
    prompts.py, line 28). Every process sampled and scored its own list, but only the main process saved its images
    and logged its rewards (main.py, lines 553-575): process 0's list is the evaluation the original reported."""
    draw = random.Random(seed + process_index)
    return [draw.choice(lines) for _ in range(count)]


def saved_image_count(config) -> int | None:
    """Images kept of an evaluation during training: the first `max_vis_images`, or all of the original's set
    (which has batch_size_per_gpu_available x max_vis_images images; the original saved every one)."""
    return None if config.eval_prompts == "original" else config.max_vis_images


class Evaluator:
    """Evaluates whatever LoRA the model's denoiser holds; each process does a share, all get the result.
    The main process shows a progress bar (images of its share) labelled `label`. `lockstep`: every process samples
    the same number of images (a shorter share repeats its last prompt, dropped after), so all make the same
    denoiser calls (sharding=fsdp: each call all-gathers the sharded weights together). `seeding`: `eval_seeding`;
    `embed`: the diversity encoder (None: no diversity numbers)."""

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
        seeding: str = "sequential",
        embed: Embedder | None = None,
    ):
        self.accelerator, self.model, self.reward = accelerator, model, reward
        self.prompts, self.options, self.batch_size = prompts, options, batch_size
        self.label = "evaluate"
        self.extra_rewards = extra_rewards or {}
        self.lockstep = lockstep
        self.seeding, self.embed = seeding, embed

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
                    self.seeding,
                    self.embed,
                ).head(len(indices))
        return EvalResult.merge(gather_object([(indices, mine)]))


def evaluator_for(session: Session, config, batch_size: int, lockstep: bool = False) -> Evaluator:
    """The evaluation of `config` (its eval prompts and sampling options) on a session's model and reward."""
    options = sampling_options_from_config(config)
    prompts = evaluation_prompts(config)
    rewards = {config.reward_fn: session.reward, **session.eval_rewards}
    return Evaluator(
        session.accelerator,
        session.model,
        session.reward,
        prompts,
        options,
        batch_size,
        session.eval_rewards,
        lockstep,
        seeding=config.eval_seeding,
        embed=embedder_for(config, rewards),
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
        "eval_seeding": config.eval_seeding,  # module docstring
        "diversity_encoder": encoder_name(config),  # whose image embeddings the diversity numbers use
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
