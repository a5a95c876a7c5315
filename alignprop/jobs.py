"""What one invocation does (train, evaluate or soup), with every input checked before anything is written.

`prepare` validates the whole config and the files it names and returns a `Job`; only then is the run
directory created (`logdir/RUN`, also for a resumed run: the checkpoint's run is never written to).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alignprop import checkpoint, evaluate, runtime, soup, train
from alignprop.batching import BatchPlan
from alignprop.errors import UserError
from alignprop.lora_files import check_matches_config, read_lora
from alignprop.rundir import DISK_FULL, cannot_write, create_run_dir, os_error_behind, write_config

BASE_MODEL = soup.BASE_MODEL  # resume_from value meaning "evaluate the base model, no LoRA"


@dataclass(frozen=True)
class Job:
    kind: str  # "train" | "evaluate" | "soup"
    plan: BatchPlan
    work: Callable[[Path], object]  # run_dir -> result


def check_eval_options(config) -> None:
    count = config.eval_images_per_prompt
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"eval_images_per_prompt must be a positive integer, got {count!r}")


def evaluation_lora(config) -> Path | None:
    """The LoRA file that only_eval evaluates (None: the base model)."""
    if not config.resume_from:
        raise UserError(
            "only_eval needs --config.resume_from=<run dir | checkpoint dir | LoRA dir> "
            f"(or {BASE_MODEL!r} for the base model)"
        )
    if config.resume_from == BASE_MODEL:
        return None
    path = checkpoint.resolve_lora(config.resume_from)
    read_lora(path)  # readable and a diffusers UNet LoRA
    return path


def prepare_training(config, plan: BatchPlan) -> Job:
    train.check_options(config)
    if config.resume_from:
        saved = checkpoint.resolve(config.resume_from)
        checkpoint.check_resumable(saved, config.num_epochs, plan.num_processes, plan.updates_per_epoch)
        check_matches_config(read_lora(saved.lora_path), config.lora)
        saved.training_state()  # readable (and plain data) before the run directory is made
        config.resume_from = str(saved.path)  # the exact checkpoint, as config.json will record it
    return Job("train", plan, lambda run_dir: train.train(config, plan, run_dir))


def prepare(config, num_processes: int) -> Job:
    """Validate everything (raising UserError) and say what to run; writes nothing."""
    plan = runtime.validate(config, num_processes)
    check_eval_options(config)
    if config.soup_inference:
        inputs = soup.prepare(config)
        return Job("soup", plan, lambda run_dir: soup.run_soup(config, plan.batch_size, run_dir, inputs))
    if config.only_eval:
        lora = evaluation_lora(config)
        return Job("evaluate", plan, lambda run_dir: evaluate.run_evaluation(config, plan.batch_size, run_dir, lora))
    return prepare_training(config, plan)


def shared_run_dir(config) -> Path:
    """The main process creates logdir/RUN and saves the config; every process gets the same path."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    holder = [None]
    if state.is_main_process:
        run_dir = create_run_dir(config.logdir, config.run_name)
        write_config(run_dir, config.to_json_best_effort(indent=2))
        holder = [str(run_dir)]
    if state.num_processes > 1:
        broadcast_object_list(holder)
    return Path(holder[0])


def run(config) -> tuple[Job, Path, object]:
    """Prepare, create the run directory, run; returns the job, the directory and the job's result."""
    job = prepare(config, runtime.process_count())
    run_dir = shared_run_dir(config)
    try:
        return job, run_dir, job.work(run_dir)
    except Exception as error:
        problem = os_error_behind(error)
        if problem is None or not (isinstance(error, checkpoint.SaveError) or problem.errno in DISK_FULL):
            raise  # not a write that the disk refused: a bug, keep its traceback
        then = checkpoint.resume_hint(run_dir, config.resume_from) if job.kind == "train" else "run it again"
        raise cannot_write(problem, run_dir, then) from None
