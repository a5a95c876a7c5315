"""Evaluate every checkpoint of a run (`eval_all_checkpoints=True` with only_eval and `resume_from=RUN`).

The base model, then each complete checkpoint of RUN in update order, each evaluated as the evaluate mode would
(a checkpoint's moving average where it holds one), into its own directory of the evaluation EVAL:

    EVAL/base/, EVAL/checkpoint_N/   images/, grid.png, summary.json (what `alignprop compare` reads), and
                                     evaluated.json, written last and atomically: an evaluation holding it is finished
    EVAL/checkpoints.json            what is evaluated (RUN) and how (the evaluation's settings)
    EVAL/table.md, EVAL/table.csv    metric x update: the mean over the images and its standard error
    EVAL/curves.png                  a panel per metric: mean +- standard error against the update

EVAL is logdir/run_name (without a run_name: logdir/<RUN's name>_checkpoints), so running the same command again
after an interruption continues there: finished evaluations are kept, an unfinished one is done again.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from alignprop import checkpoint
from alignprop.denoiser_files import check_denoiser_folder, is_denoiser_folder, load_denoiser_weights
from alignprop.errors import UserError, excerpt
from alignprop.evaluate import evaluation_context, evaluator_for, log_to_trackers, write_evaluation
from alignprop.lora_files import add_adapter, copy_into_adapter, read_lora
from alignprop.pause import pause_point
from alignprop.plot import Panel, Series, save_panels
from alignprop.report import mean_and_standard_error, per_image_metrics
from alignprop.rundir import slugify
from alignprop.session import Session, start_trackers

SWEEP_FILE = "checkpoints.json"
DONE_FILE = "evaluated.json"
SUMMARY_FILE = "summary.json"
TABLE_FILES = ("table.md", "table.csv")
CURVES_FILE = "curves.png"
BASE_DIR = "base"
ADAPTER = "default"  # the adapter name the evaluate mode loads a LoRA under
# Settings besides evaluation_context's that decide which images an evaluation holds (a resumed one must match).
IMAGE_SETTINGS = ("eval_prompts", "eval_images_per_prompt", "resolution", "eval_reward_fns", "max_vis_images")


@dataclass(frozen=True)
class Target:
    """One evaluation of the sweep: its directory name, the update its weights are from, the weights (None: base)."""

    name: str
    update: int
    weights: Path | None


@dataclass(frozen=True)
class Sweep:
    source: Path  # RUN
    run_dir: Path  # EVAL
    targets: list[Target]
    settings: dict


def sweep_settings(config) -> dict:
    """What the evaluations of one sweep must share (checked again when a sweep is continued)."""
    context = evaluation_context(config, None, "evaluate")
    context = {key: value for key, value in context.items() if key not in ("mode", "lora")}
    return json.loads(json.dumps({**context, **{key: config.get(key) for key in IMAGE_SETTINGS}}))


def checked_weights(saved: checkpoint.Checkpoint) -> Path:
    """A checkpoint's weights as the evaluate mode reads them (its moving average where it has one), readable."""
    path = checkpoint.evaluated_weights(saved)
    if is_denoiser_folder(path):
        check_denoiser_folder(path)
    else:
        read_lora(path)
    return path


def targets_of(source: Path) -> list[Target]:
    """The base model, then every complete checkpoint of the run `source`, in update order."""
    saved = checkpoint.complete_checkpoints(source / checkpoint.CHECKPOINTS_DIR)
    found = [Target(c.path.name, c.info.get("update", 0), checked_weights(c)) for c in saved]
    return [Target(BASE_DIR, 0, None), *found]


def sweep_dir(config, source: Path) -> Path:
    name = slugify(config.run_name) if config.run_name else f"{slugify(source.resolve().name)}_checkpoints"
    return Path(config.logdir) / name


def prepare(config) -> Sweep:
    """Check the run and the evaluation directory (UserError, one line); writes nothing."""
    given = config.resume_from
    source = Path(given) if given else None
    if source is None or not (source / checkpoint.CHECKPOINTS_DIR).is_dir():
        raise UserError(
            f"eval_all_checkpoints needs --config.resume_from=<a training run directory>; {excerpt(given)} has no "
            f"{checkpoint.CHECKPOINTS_DIR}/ directory"
        )
    targets = targets_of(source)
    if len(targets) == 1:
        raise UserError(f"resume_from={excerpt(given)} holds no complete checkpoint to evaluate")
    run_dir, settings = sweep_dir(config, source), sweep_settings(config)
    check_continuable(run_dir, source, settings)
    return Sweep(source.resolve(), run_dir, targets, settings)


def check_continuable(run_dir: Path, source: Path, settings: dict) -> None:
    """An existing EVAL may only be continued: the same run, evaluated the same way."""
    if not run_dir.exists() or {path.name for path in run_dir.iterdir()} <= {"config.json"}:
        return  # new, or killed before its first file (run_job writes config.json first)
    try:
        recorded = json.loads((run_dir / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict) or recorded.get("source") != str(source.resolve()):
        raise UserError(
            f"{excerpt(str(run_dir))} exists and is not an evaluation of every checkpoint of {excerpt(str(source))}: "
            "give another --config.run_name"
        )
    before = recorded.get("settings") if isinstance(recorded.get("settings"), dict) else {}
    changed = sorted(key for key in settings.keys() | before.keys() if settings.get(key) != before.get(key))
    if changed:
        raise UserError(
            f"{excerpt(str(run_dir))} evaluated {excerpt(str(source))} with other settings ({', '.join(changed)}); "
            "continue it with the same ones or give another --config.run_name"
        )


# --- running -----------------------------------------------------------------------------------------------


def is_finished(directory: Path) -> bool:
    return (directory / DONE_FILE).is_file()


def write_atomically(path: Path, text: str) -> None:
    """A file that is either absent or whole: written beside, fsynced, renamed."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)


def load_weights(denoiser, weights: Path) -> None:
    """A checkpoint's weights over the previous one's: a full denoiser copied over, a LoRA into the adapter."""
    if is_denoiser_folder(weights):
        load_denoiser_weights(denoiser, weights)
    elif ADAPTER in (getattr(denoiser, "peft_config", None) or {}):
        copy_into_adapter(denoiser, read_lora(weights), ADAPTER)  # the same layout: every checkpoint of one run
    else:
        add_adapter(denoiser, read_lora(weights), adapter_name=ADAPTER)


def run_sweep(session: Session, config, batch_size: int, run_dir: Path, sweep: Sweep) -> list[dict]:
    """Evaluate every unfinished target in order (the base first, before any weights are loaded), then write the
    table and the curves from every target's summary.json; returns the table's rows."""
    pending = [target for target in sweep.targets if not is_finished(run_dir / target.name)]  # before any write
    evaluator = evaluator_for(session, config, batch_size)
    accelerator = evaluator.accelerator
    start_trackers(session, config, run_dir)
    if accelerator.is_main_process:
        record = {"source": str(sweep.source), "settings": sweep.settings}
        write_atomically(run_dir / SWEEP_FILE, json.dumps(record, indent=2) + "\n")
    for step, target in enumerate(pending):
        if target.weights is not None:
            load_weights(session.model.denoiser, target.weights)
        evaluator.label = f"evaluate {target.name} ({step + 1}/{len(pending)})"  # its progress bar
        result = evaluator(config.seed)
        if accelerator.is_main_process:
            directory = run_dir / target.name
            shutil.rmtree(directory, ignore_errors=True)  # an interrupted attempt's images
            weights = None if target.weights is None else str(target.weights)
            context = {**evaluation_context(config, weights, "evaluate"), "checkpoint": target.name}
            summary = write_evaluation(result, directory, {**context, "update": target.update})
            write_atomically(directory / DONE_FILE, json.dumps({"update": target.update}) + "\n")
            log_to_trackers(accelerator, "eval", summary, directory / "grid.png", step=target.update)
        pause_point(f"evaluated_{target.name}")  # test hook: SIGKILL after this evaluation is finished
    rows = []
    if accelerator.is_main_process:
        rows = table_rows(run_dir, sweep.targets)
        write_table(rows, run_dir)
        save_panels(curve_panels(rows), run_dir / CURVES_FILE)
    accelerator.end_training()
    return rows


# --- the table and the curves ------------------------------------------------------------------------------


def table_rows(run_dir: Path, targets: list[Target]) -> list[dict]:
    """One row per metric and target, in the metrics' order and then update order."""
    rows = []
    for target in targets:
        path = run_dir / target.name / SUMMARY_FILE
        for metric, values in per_image_metrics(json.loads(path.read_text(encoding="utf-8")), path).items():
            mean, error = mean_and_standard_error(values)
            rows.append(
                {
                    "metric": metric,
                    "checkpoint": target.name,
                    "update": target.update,
                    "images": len(values),
                    "mean": mean,
                    "standard_error": error,
                }
            )
    order = list(dict.fromkeys(row["metric"] for row in rows))
    return sorted(rows, key=lambda row: order.index(row["metric"]))  # stable: update order within a metric


def write_table(rows: list[dict], run_dir: Path) -> None:
    with open(run_dir / "table.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    columns = list(dict.fromkeys((row["checkpoint"], row["update"]) for row in rows))
    lines = [
        "| metric | " + " | ".join(f"{name} (update {update})" for name, update in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for metric in dict.fromkeys(row["metric"] for row in rows):
        cells = {
            row["checkpoint"]: f"{row['mean']:.4g} ± {row['standard_error']:.2g}"
            for row in rows
            if row["metric"] == metric
        }
        lines.append(f"| {metric} | " + " | ".join(cells.get(name, "") for name, _ in columns) + " |")
    (run_dir / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def curve_panels(rows: list[dict]) -> list[Panel]:
    """A panel per metric: its mean +- standard error at each target's update."""
    panels = []
    for metric in dict.fromkeys(row["metric"] for row in rows):
        of_metric = [row for row in rows if row["metric"] == metric]
        updates = [float(row["update"]) for row in of_metric]
        errors = [0.0 if math.isnan(row["standard_error"]) else row["standard_error"] for row in of_metric]
        line = Series(updates, [row["mean"] for row in of_metric], errors)
        ticks = sorted(set(updates)) if len(set(updates)) <= 12 else None
        panels.append(Panel(metric, "update", f"{metric} (mean)", [line], x_ticks=ticks))
    return panels
