"""Compare evaluations of runs on the same prompts and noise: `python -m alignprop.compare A B [C ...] [--out DIR]`.

Each argument is an evaluation (a directory holding the summary.json `alignprop.report.write_evaluation` writes,
or that file) or a training run directory (its last evaluation, `RUN/eval/update_N/`). Images are paired by
(prompt index, image index): the evaluations must hold the same prompts in the same order, drawn with the same
seeding at the same resolution, so image k of every column started from the same noise. Anything else is refused
in one line, before anything is written.

DIR/compare.csv and DIR/compare.md: for every metric (the reward, named by its reward_fn, and every other
per-image number) and every column, the mean and its standard error over the images; for every column after the
first, the paired difference with the first (the mean of the per-image differences) and a 95% percentile bootstrap
interval that resamples prompts (a prompt's images stay together: they share a prompt, and across columns their
noise), seeded so the files are reproducible. DIR/compare.png: one panel per metric, mean +- standard error per
column.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from alignprop.errors import ArgumentParser, UserError, excerpt
from alignprop.plot import Panel, Series, save_panels
from alignprop.report import mean_and_standard_error, per_image_metrics

SUMMARY = "summary.json"
OUTPUTS = ("compare.md", "compare.csv", "compare.png")
SEEDING_WHEN_UNRECORDED = "sequential"  # summaries written before eval_seeding was recorded used this one
CONFIDENCE = 0.95
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CHUNK = 1_000  # bootstrap resamples drawn at once (bounds the memory for large prompt sets)


@dataclass(frozen=True)
class Evaluation:
    """One column: an evaluation's per-image numbers and what decides whether it pairs with another."""

    label: str
    source: Path  # its summary.json
    prompts: list[str]  # of every image, in order
    seeding: str  # e.g. "sequential, seed 42"
    resolution: str  # e.g. "32 x 32"
    metrics: dict[str, np.ndarray]  # metric name -> one value per image


@dataclass(frozen=True)
class Row:
    """One metric of one column; `difference`, `low`, `high`: vs the first column (None for the first)."""

    metric: str
    label: str
    source: str
    images: int
    mean: float
    standard_error: float
    difference: float | None = None
    low: float | None = None
    high: float | None = None


# --- reading evaluations --------------------------------------------------------------------------------------


def summary_path(argument: str) -> Path:
    """The summary.json an argument names: the file, a directory holding it, or a training run's last evaluation."""
    path = Path(argument)
    if path.is_file():
        return path
    if (path / SUMMARY).is_file():
        return path / SUMMARY
    evaluations = sorted((path / "eval").glob(f"update_*/{SUMMARY}"))
    if evaluations:
        return evaluations[-1]  # update_NNNNNN: the names sort by update
    raise UserError(
        f"{excerpt(argument)} holds no evaluation: give an evaluation directory (with {SUMMARY}) or a training run "
        "directory (with eval/update_N/)"
    )


def column_label(path: Path) -> str:
    """The run directory's name; a training run's evaluation adds its update (RUN@update_N)."""
    directory = path.parent
    if directory.parent.name == "eval" and directory.name.startswith("update_"):
        return f"{directory.parent.parent.name}@{directory.name}"
    return directory.resolve().name


def read_summary(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("images"), list) or not summary["images"]:
        raise UserError(f"{path} is not an evaluation's summary (no per-image entries)")
    if summary.get("mode") == "train_samples":
        raise UserError(f"{path} holds training samples, not an evaluation: give RUN or RUN/eval/update_N")
    return summary


def load_evaluation(argument: str) -> Evaluation:
    path = summary_path(argument)
    summary = read_summary(path)
    seeding = f"{summary.get('eval_seeding', SEEDING_WHEN_UNRECORDED)}, seed {summary.get('seed')}"
    resolution = summary.get("resolution")
    shown = " x ".join(str(side) for side in resolution) if resolution else "not recorded"
    prompts = [str(entry.get("prompt")) for entry in summary["images"]]
    return Evaluation(column_label(path), path, prompts, seeding, shown, per_image_metrics(summary, path))


def with_unique_labels(evaluations: list[Evaluation]) -> list[Evaluation]:
    """The same label twice (one run given twice, equal run names) gets #2, #3, ..."""
    seen: dict[str, int] = {}
    unique = []
    for evaluation in evaluations:
        seen[evaluation.label] = seen.get(evaluation.label, 0) + 1
        count = seen[evaluation.label]
        unique.append(evaluation if count == 1 else replace(evaluation, label=f"{evaluation.label}#{count}"))
    return unique


# --- pairing --------------------------------------------------------------------------------------------------


def check_pairable(first: Evaluation, other: Evaluation) -> None:
    """One line when the images of `other` did not start from the same prompts and noise as those of `first`."""
    where = f"cannot pair {first.source} with {other.source}"
    if first.prompts != other.prompts:
        if len(first.prompts) != len(other.prompts):
            detail = f"{len(first.prompts)} images vs {len(other.prompts)}"
        else:
            k = next(i for i, (a, b) in enumerate(zip(first.prompts, other.prompts)) if a != b)
            detail = f"image {k}: {excerpt(first.prompts[k], 40)} vs {excerpt(other.prompts[k], 40)}"
        raise UserError(f"{where}: their prompts differ ({detail}); evaluate both on the same prompt set")
    if first.seeding != other.seeding:
        raise UserError(f"{where}: their seeding differs ({first.seeding} vs {other.seeding}): the noise is not shared")
    if first.resolution != other.resolution:
        raise UserError(f"{where}: their resolution differs ({first.resolution} vs {other.resolution})")


def prompt_indices(prompts: list[str]) -> np.ndarray:
    """Each image's prompt index (prompts numbered by first appearance): the unit the bootstrap resamples."""
    numbers: dict[str, int] = {}
    return np.array([numbers.setdefault(prompt, len(numbers)) for prompt in prompts])


# --- statistics -----------------------------------------------------------------------------------------------


def paired_difference(
    values: np.ndarray, first: np.ndarray, prompts: np.ndarray, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float, float]:
    """(mean of values - first, and its `CONFIDENCE` percentile bootstrap interval): each resample draws as many
    prompts as there are, with replacement, and takes the mean difference over their images."""
    differences = values - first
    count = int(prompts.max()) + 1
    sums = np.bincount(prompts, weights=differences, minlength=count)
    sizes = np.bincount(prompts, minlength=count)
    generator = np.random.default_rng(seed)  # a fresh one per difference: a row does not depend on the others
    statistics = []
    for start in range(0, resamples, CHUNK):
        picks = generator.integers(0, count, size=(min(CHUNK, resamples - start), count))
        statistics.append(sums[picks].sum(axis=1) / sizes[picks].sum(axis=1))
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(np.concatenate(statistics), [tail, 1 - tail])
    return float(differences.mean()), float(low), float(high)


def compare(evaluations: list[Evaluation]) -> list[Row]:
    """Rows metric by metric (in order of first appearance), column by column; a column lacking a metric has no
    row for it, and a difference needs the metric in the first column."""
    for other in evaluations[1:]:
        check_pairable(evaluations[0], other)
    first, prompts = evaluations[0], prompt_indices(evaluations[0].prompts)
    metrics = list(dict.fromkeys(name for evaluation in evaluations for name in evaluation.metrics))
    rows = []
    for metric in metrics:
        for column, evaluation in enumerate(evaluations):
            if metric not in evaluation.metrics:
                continue
            values = evaluation.metrics[metric]
            row = Row(metric, evaluation.label, str(evaluation.source), len(values), *mean_and_standard_error(values))
            if column > 0 and metric in first.metrics:
                difference, low, high = paired_difference(values, first.metrics[metric], prompts)
                row = replace(row, difference=difference, low=low, high=high)
            rows.append(row)
    return rows


# --- the files ------------------------------------------------------------------------------------------------


def cell(row: Row) -> str:
    return f"{row.mean:.4g} ± {row.standard_error:.2g}"


def difference_cell(row: Row) -> str:
    return "" if row.difference is None else f"{row.difference:+.3g} [{row.low:+.3g}, {row.high:+.3g}]"


def markdown(rows: list[Row], evaluations: list[Evaluation]) -> str:
    """The table of compare.md: per metric a row of means and a row of paired differences with the first column."""
    first, labels = evaluations[0], [evaluation.label for evaluation in evaluations]
    prompts = len(set(first.prompts))
    lines = [
        "# Comparison of evaluations",
        "",
        "| column | evaluation |",
        "|---|---|",
        *[f"| {evaluation.label} | `{evaluation.source}` |" for evaluation in evaluations],
        "",
        f"Paired on the same {len(first.prompts)} images of {prompts} prompts ({first.seeding}; {first.resolution}). "
        "Each cell: mean ± standard error over the images. Δ: the mean paired difference with "
        f"`{first.label}` and its {CONFIDENCE:.0%} bootstrap interval ({RESAMPLES} resamples of the prompts, seed "
        f"{BOOTSTRAP_SEED}).",
        "",
        f"| metric | {' | '.join(labels)} |",
        f"|---|{'---|' * len(labels)}",
    ]
    for metric in dict.fromkeys(row.metric for row in rows):
        of_metric = {row.label: row for row in rows if row.metric == metric}
        lines.append(f"| {metric} | {' | '.join(cell(of_metric[x]) if x in of_metric else '' for x in labels)} |")
        differences = [difference_cell(of_metric[x]) if x in of_metric else "" for x in labels]
        if any(differences):
            lines.append(f"| Δ vs {first.label} | {' | '.join(differences)} |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], path: Path) -> None:
    """One line per metric and column, every number in full precision."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(
            [
                "metric",
                "column",
                "evaluation",
                "images",
                "mean",
                "standard_error",
                "difference_vs_first",
                "difference_low",
                "difference_high",
            ]
        )
        for row in rows:
            optional = ["" if value is None else value for value in (row.difference, row.low, row.high)]
            writer.writerow([row.metric, row.label, row.source, row.images, row.mean, row.standard_error, *optional])


def panels(rows: list[Row], labels: list[str]) -> list[Panel]:
    """One panel per metric: each column's mean +- standard error."""
    result = []
    for metric in dict.fromkeys(row.metric for row in rows):
        of_metric = [row for row in rows if row.metric == metric]
        xs = [labels.index(row.label) for row in of_metric]
        errors = [0.0 if math.isnan(row.standard_error) else row.standard_error for row in of_metric]
        series = Series(xs, [row.mean for row in of_metric], errors, joined=False)
        result.append(Panel(metric, "", "mean +- standard error", [series], categories=labels))
    return result


def write_outputs(rows: list[Row], evaluations: list[Evaluation], directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "compare.md").write_text(markdown(rows, evaluations), encoding="utf-8")
        write_csv(rows, directory / "compare.csv")
        save_panels(panels(rows, [evaluation.label for evaluation in evaluations]), directory / "compare.png")
    except OSError as error:
        raise UserError(f"cannot write {error.filename or directory}: {error.strerror}") from None


# --- the command ----------------------------------------------------------------------------------------------


def parser(prog: str | None) -> ArgumentParser:
    parse = ArgumentParser(
        prog=prog,
        description="Compare evaluations on the same prompts and noise: mean +- standard error per metric and "
        "column, paired differences with the first column (95% bootstrap interval over prompts).",
    )
    parse.add_argument("evaluations", nargs="+", metavar="RUN_OR_EVAL", help="a run directory or an evaluation")
    parse.add_argument("--out", default=".", metavar="DIR", help="where compare.{md,csv,png} go (default: .)")
    return parse


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Read and check every evaluation, then write; any bad input is one line `error: ...`, exit 2, no file."""
    try:
        arguments = parser(prog or "python -m alignprop.compare").parse_args(argv)
        evaluations = with_unique_labels([load_evaluation(argument) for argument in arguments.evaluations])
        rows = compare(evaluations)
        write_outputs(rows, evaluations, Path(arguments.out))
    except UserError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    print(markdown(rows, evaluations), end="")
    print(f"wrote {', '.join(OUTPUTS)} in {arguments.out}")


if __name__ == "__main__":
    main()
