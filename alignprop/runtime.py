"""Validation of a whole config, before anything is written under `logdir`, and the process count."""

from __future__ import annotations

import torch
from accelerate import PartialState

from alignprop import paths, prefix, prompts, quantization, rewards, schema
from alignprop.batching import BatchPlan, fill_derived_fields, plan_batches
from alignprop.errors import UserError
from alignprop.models import check_model_available, check_model_name, inference_dtype
from alignprop.rewards.relative import check_relative_control
from alignprop.rundir import check_logdir
from alignprop.schema import TRACKERS
from alignprop.truncation import truncation_from_config


def effective_mixed_precision(requested: str) -> str:
    """fp16 needs a GPU; on a CPU-only machine fall back to fp32 (`jobs.prepare` warns once all checks passed)."""
    inference_dtype(requested)  # validates the name
    return "no" if requested == "fp16" and not torch.cuda.is_available() else requested


def check_tracker_installed(tracker: str) -> None:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"wandb": is_wandb_available, "tensorboard": is_tensorboard_available}.get(tracker)
    if available is not None and not available():
        raise UserError(f"tracker={tracker} needs the {tracker} package (in requirements.txt): pip install {tracker}")


def check_cadence(config) -> None:
    """The checkpoint, evaluation and non-finite settings."""
    keys = (("save_freq", 0), ("num_checkpoint_limit", 1), ("vis_freq", 0), ("max_vis_images", 0))
    for key, minimum in (*keys, ("max_nonfinite_in_a_row", 1), ("eval_images_per_prompt", 1)):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"{key} must be an integer >= {minimum}, got {value!r}")


def check_finetune(config) -> None:
    """Settings that full fine-tuning (train.finetune="full") cannot honour."""
    if config.train.finetune == "full" and config.native_dtype:
        raise UserError(
            "native_dtype runs the frozen networks in their own dtype with autocast off; with train.finetune=full the "
            "denoiser holds fp32 master weights, so it would run in fp32: drop native_dtype"
        )


def check_sharding(config) -> None:
    """Settings that sharding="fsdp" cannot honour, each refused with its reason."""
    if config.sharding != "fsdp":
        return
    if config.compile_denoiser != "off":
        raise UserError(
            "sharding=fsdp with compile_denoiser: torch.compile of the FSDP-sharded denoiser is not supported here; "
            "set compile_denoiser=off"
        )
    if config.mixed_precision == "fp16":
        raise UserError(
            "sharding=fsdp runs with mixed_precision=bf16 or no: fp16's gradient scaler is not supported on sharded "
            "gradients here"
        )
    if config.train.use_8bit_adam:
        raise UserError("sharding=fsdp with train.use_8bit_adam: bitsandbytes' AdamW8bit does not take sharded tensors")


def validate(config, num_processes: int) -> BatchPlan:
    """Check the whole config (raising UserError) and fill in derived fields; returns the batch plan."""
    schema.check(config)
    check_sharding(config)  # first: the refusal is the config's, not the machine's (fp16 on a CPU, no bitsandbytes)
    quantization.check(config)
    if config.tracker not in TRACKERS:
        raise UserError(f"tracker={config.tracker!r}; choose one of: {', '.join(TRACKERS)}")
    check_tracker_installed(config.tracker)
    if config.train.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("train.use_8bit_adam=True needs bitsandbytes: pip install bitsandbytes") from None
    config.mixed_precision = effective_mixed_precision(config.mixed_precision)
    check_logdir(config.logdir)
    check_model_name(config.pretrained.model)
    check_model_available(config.pretrained.model, config.pretrained.revision)
    rewards.check_reward_name(config.reward_fn)
    check_relative_control(config.reward_fn, tuple(config.rewards.relative_control))
    prompts.load_prompts(config.prompt_fn)
    prompts.load_prompts(config.eval_prompt_fn)
    truncation_from_config(config)
    paths.check(config)
    prefix.check(config)
    check_cadence(config)
    check_finetune(config)
    batches = plan_batches(config.train, num_processes)
    if not (config.only_eval or config.soup_inference):  # what the learning-rate schedule of a training run reaches
        schema.check_warmup(config.train, config.num_epochs * batches.updates_per_epoch)
    fill_derived_fields(config.train, batches)
    return batches


def process_count() -> int:
    """Processes in this launch (accelerate / torchrun), without reading any variable ourselves."""
    return PartialState(cpu=not torch.cuda.is_available()).num_processes
