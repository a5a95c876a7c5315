"""What one invocation does (train, evaluate or soup), with everything that can fail checked or loaded
before anything is written.

`prepare` validates the whole config and the files it names and returns a `Job`; `run_job` then loads the
model and the reward (the `Session`), and only then creates the run directory (`logdir/RUN`, also for a
resumed run: the checkpoint's run is never written to).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alignprop import checkpoint, evaluate, every_checkpoint, paths, runtime, soup, train
from alignprop.batching import BatchPlan
from alignprop.checkpoint import BASE_MODEL, is_base_model
from alignprop.denoiser_files import check_denoiser_folder, is_denoiser_folder
from alignprop.errors import UserError, excerpt
from alignprop.held_output import held_back_stderr
from alignprop.lora_files import check_matches_config, is_original_checkpoint, read_lora
from alignprop.rundir import DISK_FULL, cannot_write, create_run_dir, os_error_behind, write_config
from alignprop.session import Session, build_session
from alignprop.trainable import LORA_DIR, check_saved

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    kind: str  # "train" | "evaluate" | "soup"
    batches: BatchPlan
    work: Callable[[Session, Path], object]  # (session, run_dir) -> result
    run_dir: Path | None = None  # a fixed run directory, made if missing (eval_all_checkpoints continues in it)


def evaluation_weights(config) -> Path | None:
    """The LoRA file or denoiser folder that only_eval evaluates (None: the base model)."""
    if not config.resume_from:
        raise UserError(
            "only_eval needs --config.resume_from=<run dir | checkpoint dir | LoRA dir | denoiser dir> "
            f"(or {BASE_MODEL!r} for the base model)"
        )
    if is_base_model(config.resume_from):
        return None
    path = checkpoint.resolve_weights(config.resume_from)
    if is_denoiser_folder(path):
        check_denoiser_folder(path)  # its config and weights' headers read (the weights load with the model)
    else:
        read_lora(path)  # readable and a diffusers LoRA
    return path


def prepare_training(config, batches: BatchPlan) -> Job:
    if config.resume_from and is_original_checkpoint(Path(config.resume_from)):
        if config.train.finetune != "lora":
            raise UserError(
                f"resume_from={config.resume_from!r} is an original AlignProp checkpoint (a LoRA); "
                f"train.finetune={config.train.finetune!r} cannot start from it"
            )
        check_matches_config(read_lora(Path(config.resume_from)), config.lora)  # its LoRA only: no usable state
    elif config.resume_from:
        saved = checkpoint.resolve(config.resume_from)
        checkpoint.check_resumable(saved, config.num_epochs, batches.updates_per_epoch)
        check_saved(saved.path, saved.finetune, config, saved.denoiser_name)
        checkpoint.read_training_state(saved)  # readable, complete, finite: before the run directory is made
        config.resume_from = str(saved.path)  # the exact checkpoint, as config.json will record it
    return Job("train", batches, lambda session, run_dir: train.train(config, batches, run_dir, session))


def prepare(config, num_processes: int) -> Job:
    """Validate everything (raising UserError) and say what to run; writes nothing."""
    requested_precision = config.mixed_precision
    job = prepare_job(config, runtime.validate(config, num_processes))
    if requested_precision != config.mixed_precision:  # after every check: a bad input stays one error line
        logger.warning("mixed_precision=%s needs a GPU; running in fp32 on the CPU", requested_precision)
    return job


def prepare_job(config, batches: BatchPlan) -> Job:
    size = batches.batch_size
    if config.soup_inference:
        inputs = soup.prepare(config)
        return Job("soup", batches, lambda session, run_dir: soup.run_soup(session, config, size, run_dir, inputs))
    if config.get("eval_all_checkpoints"):
        sweep = every_checkpoint.prepare(config)
        work = lambda session, run_dir: every_checkpoint.run_sweep(session, config, size, run_dir, sweep)  # noqa: E731
        return Job("evaluate", batches, work, sweep.run_dir)
    if config.only_eval:
        weights = evaluation_weights(config)
        work = lambda session, run_dir: evaluate.run_evaluation(session, config, size, run_dir, weights)  # noqa: E731
        return Job("evaluate", batches, work)
    return prepare_training(config, batches)


def shared_run_dir(config, fixed: Path | None = None) -> Path:
    """The main process creates logdir/RUN (or `fixed`, which may exist) and saves the config; every process gets
    the same path."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    holder = [None]
    if state.is_main_process:
        run_dir = create_run_dir(config.logdir, config.run_name) if fixed is None else make_dir(fixed)
        write_config(run_dir, config.to_json_best_effort(indent=2))
        holder = [str(run_dir)]
    if state.num_processes > 1:
        broadcast_object_list(holder)
    return Path(holder[0])


def make_dir(path: Path) -> Path:
    """`path` made if missing (a continued eval_all_checkpoints keeps what it holds)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the run directory {excerpt(str(path))}: {error.strerror}") from None
    return path


def holds_only_the_config(run_dir: Path) -> bool:
    """Nothing but config.json was written (a start-up failure: LoRA targets, prompts the reward cannot read)."""
    return all(path.name == "config.json" or path.is_dir() for path in run_dir.rglob("*"))


def final_weights(config, denoiser_name: str) -> str:
    """Where in the run directory the run's final weights go (`Trainable.final_dir`), as the start-up line says."""
    if config.train.finetune == "full":
        return f"final denoiser: {denoiser_name}/"
    return f"final LoRA: {LORA_DIR}/"


def resumed_epochs(config) -> int:
    """The epochs a resumed run has completed (0 for a new run or one starting from an original AlignProp LoRA)."""
    if not config.resume_from or is_original_checkpoint(Path(config.resume_from)):
        return 0
    return checkpoint.resolve(config.resume_from).epoch


def evaluations_in_training(config, updates: int, first_update: int = 0) -> int:
    """How many evaluations a training run from `first_update` to `updates` makes (`train.Trainer.fit`): one before
    its first update, one after every `vis_freq`-th update, and one after the last if that was not one of them."""
    due = lambda update: train.evaluation_due(config, update)  # noqa: E731
    return 1 + sum(due(update) for update in range(first_update + 1, updates + 1)) + (not due(updates))


def describe_evaluation(config, updates: int, first_update: int = 0) -> str:
    """The start-up line's evaluation: images per evaluation, how many evaluations, the images in all."""
    images = len(evaluate.evaluation_prompts(config))
    count = evaluations_in_training(config, updates, first_update)
    every = f"every {config.vis_freq} updates" if config.vis_freq > 1 else "after every update"
    every = every if config.vis_freq > 0 and config.visualize_eval else "after training"
    return (
        f"evaluation: {images} images ({config.eval_prompt_fn}, {config.eval_prompts}) at the start and {every}: "
        f"{count} evaluations, {images * count} images"
    )


def describe(job: Job, config, run_dir: Path, family: str = "", denoiser_name: str = "unet") -> str:
    """The start-up lines: where things go and, for training, the plan (`describe_plan`)."""
    lines = [f"run directory: {run_dir}"]
    if job.kind == "train":
        lines += describe_plan(config, job.batches, resumed_epochs(config), family, denoiser_name)
    return "\n".join(lines)


def describe_plan(config, b: BatchPlan, first: int = 0, family: str = "", denoiser_name: str = "unet") -> list[str]:
    """A training run's arithmetic (samples, updates, denoiser calls), what it saves and evaluates, its path."""
    path = paths.from_config(config, family)
    updates = (config.num_epochs - first) * b.updates_per_epoch
    return [
        f"batches: {b.num_processes} process(es) x {b.batch_size} samples per pass x "
        f"{b.gradient_accumulation_steps} passes = {config.train.total_batch_size} samples per update; "
        f"{b.updates_per_epoch} update(s) per epoch x {config.num_epochs} epochs",
        *describe_calls(
            path.expected_calls(),
            updates * config.train.total_batch_size,
            config.grad_checkpoint or config.block_checkpoint,
        ),
        f"checkpoints: {checkpoint.CHECKPOINTS_DIR}/ {checkpoint.describe_schedule(config, first)}",
        f"{final_weights(config, denoiser_name)}; metrics: metrics.jsonl (both in the run directory)",
        describe_evaluation(config, config.num_epochs * b.updates_per_epoch, first * b.updates_per_epoch),
        *path.describe().splitlines(),
    ]


def describe_calls(calls: paths.base.Calls, samples: int, checkpointed: bool) -> list[str]:
    """Denoiser calls per training sample (the path's mean; one call over [uncond; cond] counts once) and in all."""
    count = lambda value: f"{value:,.1f}".removesuffix(".0")  # noqa: E731
    lines = [
        f"denoiser calls per sample: {count(calls.with_gradient)} with gradient + {count(calls.without_gradient)} "
        f"without (mean); this run's {samples:,} samples: {count(calls.with_gradient * samples)} + "
        f"{count(calls.without_gradient * samples)}"
    ]
    if checkpointed:  # what the backward adds to the forward passes counted above
        lines.append("  (checkpointing: each call with gradient runs a second time in the backward)")
    return lines


def run_job(config) -> tuple[Job, Path, object]:
    """Prepare, load, create the run directory, run; returns the job, the directory and the job's result."""
    from accelerate import PartialState

    job = prepare(config, runtime.process_count())
    with held_back_stderr():  # loading bars and warnings appear only if everything loads (else: one error line)
        session = build_session(config)  # a model or reward that cannot load fails here, before any file exists
    run_dir = shared_run_dir(config, job.run_dir)
    if PartialState().is_main_process:
        print(describe(job, config, run_dir, session.model.name, session.model.denoiser_name), flush=True)
    try:
        return job, run_dir, job.work(session, run_dir)
    except Exception as error:
        if PartialState().is_main_process and holds_only_the_config(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # failed before writing anything: leave nothing behind
        problem = os_error_behind(error)
        if problem is None or not (isinstance(error, checkpoint.SaveError) or problem.errno in DISK_FULL):
            raise  # not a write that the disk refused: a bug, keep its traceback
        then = checkpoint.resume_hint(run_dir, config.resume_from) if job.kind == "train" else "run it again"
        raise cannot_write(problem, run_dir, then) from None
