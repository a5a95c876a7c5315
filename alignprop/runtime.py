"""Everything decided once before a run starts: validation, the accelerator, the run directory.

Configuration errors are found here, before anything is written under `logdir`.
"""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration

from alignprop import prompts, rewards
from alignprop.batching import BatchPlan, fill_derived_fields, plan_batches
from alignprop.errors import UserError
from alignprop.models import check_model_available, check_model_name, inference_dtype
from alignprop.sampling import truncation_from_config

logger = logging.getLogger(__name__)
TRACKERS = ("none", "wandb", "tensorboard")


def effective_mixed_precision(requested: str) -> str:
    """fp16 needs a GPU; on a CPU-only machine fall back to fp32 with a warning rather than fail."""
    inference_dtype(requested)  # validates the name
    if requested == "fp16" and not torch.cuda.is_available():
        logger.warning("mixed_precision=fp16 needs a GPU; running in fp32 on the CPU")
        return "no"
    return requested


def validate(config, num_processes: int) -> BatchPlan:
    """Check the whole config (raising UserError) and fill in derived fields; returns the batch plan."""
    if config.tracker not in TRACKERS:
        raise UserError(f"tracker={config.tracker!r}; choose one of: {', '.join(TRACKERS)}")
    if config.train.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("train.use_8bit_adam=True needs bitsandbytes: pip install bitsandbytes") from None
    config.mixed_precision = effective_mixed_precision(config.mixed_precision)
    check_model_name(config.pretrained.model)
    check_model_available(config.pretrained.model, config.pretrained.revision)
    rewards.check_reward_name(config.reward_fn)
    prompts.load_prompts(config.prompt_fn)
    prompts.load_prompts(config.eval_prompt_fn)
    truncation_from_config(config)
    plan = plan_batches(config.train, num_processes)
    fill_derived_fields(config.train, plan)
    return plan


def process_count() -> int:
    """Processes in this launch (accelerate / torchrun), without reading any variable ourselves."""
    return PartialState(cpu=not torch.cuda.is_available()).num_processes


def make_accelerator(config, run_dir) -> Accelerator:
    torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
    torch.backends.cudnn.allow_tf32 = config.allow_tf32
    return Accelerator(
        mixed_precision=config.mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with=None if config.tracker == "none" else config.tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
    )
