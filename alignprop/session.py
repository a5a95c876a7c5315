"""What every job (train, evaluate, soup) holds: the accelerator, the model in its family, the reward.

Built *before* the run directory exists, so a model or reward weights that fail to load leave nothing
under `logdir`; the trackers start once the directory is there (`start_trackers`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from alignprop import models, paths, quantization
from alignprop.errors import UserError
from alignprop.families import Family
from alignprop.prompts import configured_prompts
from alignprop.rewards import Reward, build_reward, listed_rewards
from alignprop.sampling import sampling_options_from_config


@dataclass
class Session:
    accelerator: Accelerator
    dtype: torch.dtype  # the frozen networks' inference dtype
    model: Family
    reward: Reward
    eval_rewards: dict[str, Reward]  # held-out rewards scored on every evaluation (eval_reward_fns)


def make_accelerator(config) -> Accelerator:
    torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
    torch.backends.cudnn.allow_tf32 = config.allow_tf32
    # SDPA's cuDNN kernels fail in FLUX's backward (torch 2.11 + CUDA 13 on an H200: "mha_graph.execute ... is_good()",
    # then illegal memory accesses); the flash and memory-efficient kernels SDPA falls back to do not.
    torch.backends.cuda.enable_cudnn_sdp(False)
    return Accelerator(
        mixed_precision=config.mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with=None if config.tracker == "none" else config.tracker,
        # A tracker that writes files needs a directory at construction; the run's is set in start_trackers.
        project_config=ProjectConfiguration(project_dir=config.logdir, logging_dir=config.logdir),
    )


def build_session(config) -> Session:
    """Accelerator, frozen model (on the accelerator's device) and reward, from a validated config."""
    accelerator = make_accelerator(config)
    dtype = models.inference_dtype(config.mixed_precision)
    pretrained = config.pretrained
    layout = pretrained.get("config", "")  # a single file's pipeline layout
    model = models.load_model(
        pretrained.model, pretrained.revision, dtype, pretrained.vae, layout, quantization.requested(config)
    )
    configure_model(model, config, accelerator.device)
    reward = build_reward(config, accelerator.device, dtype)
    eval_rewards = build_eval_rewards(config, accelerator.device, dtype)
    for name, scorer in {config.reward_fn: reward, **eval_rewards}.items():
        check_image_size(name, scorer, model.image_size)
    return Session(accelerator, dtype, model, reward, eval_rewards)


def configure_model(model: Family, config, device: torch.device) -> None:
    """A loaded model on `device`, set up as the config asks: sampler checks, resolution, sigma grid, prompt length,
    block checkpointing, VAE tiling / slicing, compilation, text-encoder offloading."""
    pretrained = config.pretrained
    model.pipeline.to(device)
    model.check_options(sampling_options_from_config(config))
    model.set_resolution(config.get("resolution"))  # before any prompt is encoded (SDXL / FLUX encode the size)
    model.set_sigma_grid(config.get("flow_sigmas", "pipeline"))
    paths.from_config(config, model.name).check_model(model)
    if pretrained.get("max_sequence_length", 0):
        model.set_max_sequence_length(pretrained.max_sequence_length)
    if config.block_checkpoint:
        model.denoiser.enable_gradient_checkpointing()
    if config.vae_tiling:
        model.vae.enable_tiling()
    if config.vae_slicing:
        model.vae.enable_slicing()
    if config.compile_denoiser != "off":
        model.compile_denoiser(config.compile_denoiser)
    if config.offload_text_encoders:  # every prompt the run can meet, encoded once
        prompts = configured_prompts(config, config.prompt_fn) + configured_prompts(config, config.eval_prompt_fn)
        model.offload_text_encoders(prompts)  # blank_prompts="keep": the empty prompt too


def check_image_size(name: str, reward: Reward, size: tuple[int, int]) -> None:
    """One line for a reward that cannot read the images at the run's size (the toy world's: 32 x 32 only)."""
    if reward.image_size is not None and tuple(reward.image_size) != tuple(size):
        height, width = reward.image_size
        raise UserError(
            f"reward {name!r} reads {height} x {width} images; resolution gives {size[0]} x {size[1]}: "
            f"leave resolution unset or choose another reward"
        )


def build_eval_rewards(config, device: torch.device, dtype: torch.dtype) -> dict[str, Reward]:
    """The rewards of `eval_reward_fns` (a comma list), each built as it would be as reward_fn."""
    built = {}
    for name in dict.fromkeys(listed_rewards(config.eval_reward_fns)):
        single = config.copy_and_resolve_references()
        single.reward_fn = name
        built[name] = build_reward(single, device, dtype)
    return built


def tracker_config(config) -> dict:
    """The config as one level, {"train.learning_rate": 0.001, ...}: numbers, strings and booleans as they are,
    anything else (tuples, None) as its JSON text. TensorBoard's add_hparams takes nothing else; wandb shows
    dotted keys as groups."""
    flat = {}

    def visit(prefix: str, value) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                visit(f"{prefix}{key}.", item)
        elif isinstance(value, bool | int | float | str):
            flat[prefix[:-1]] = value
        else:
            flat[prefix[:-1]] = json.dumps(value)

    visit("", json.loads(config.to_json_best_effort()))
    return flat


def start_trackers(session: Session, config, run_dir: Path) -> None:
    """wandb / tensorboard (main process only), writing into the run directory; the config logged once."""
    accelerator = session.accelerator
    accelerator.project_configuration.project_dir = str(run_dir)
    accelerator.project_configuration.logging_dir = str(run_dir)
    if accelerator.is_main_process and config.tracker != "none":
        wandb = config.wandb
        init_kwargs = {
            "wandb": {
                "entity": wandb.entity or None,  # None: wandb's default entity
                "name": wandb.name or run_dir.name,  # the run directory's name by default
                "tags": list(wandb.tags),
                "dir": str(run_dir),  # wandb writes run_dir/wandb/
            }
        }
        accelerator.init_trackers(wandb.project, config=tracker_config(config), init_kwargs=init_kwargs)
