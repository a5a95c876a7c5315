"""The curves of a training run, RUN/curves.png, from its metrics.jsonl: drawn at the end of training and on demand
(`python -m alignprop.curves RUN`).

Panels: the reward (the training batches' mean at every update, the evaluation's mean at every evaluation); every
other metric of the evaluations (held-out rewards, the reward's parts; with the training batches' mean when
training logs it too); the gradient norm (before clipping) and the learning rate over updates. Non-finite values
(a skipped update's) are not drawn.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from alignprop.errors import ArgumentParser, UserError, excerpt
from alignprop.plot import Panel, Series, save_panels

CURVES_FILE = "curves.png"
METRICS_FILE = "metrics.jsonl"
MEAN = "_mean"

logger = logging.getLogger(__name__)


def read_records(run_dir: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl; a last line cut short (a killed process) is left out."""
    path = run_dir / METRICS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}; give a training run directory") from None
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UserError(f"{path}: line {number} is not JSON") from None
    return records


def series(records: list[dict], key: str, label: str = "") -> Series:
    """(update, record[key]) of every record holding a finite number under `key`."""
    points = [
        (record["update"], float(record[key]))
        for record in records
        if isinstance(record.get(key), int | float) and math.isfinite(record[key])
    ]
    return Series([x for x, _ in points], [y for _, y in points], label=label)


def curve_panels(records: list[dict]) -> list[Panel]:
    """The panels of curves.png (module docstring), each with the values exactly as logged."""
    updates = [record for record in records if not record.get("eval") and "reward_mean" in record]
    evaluations = [record for record in records if record.get("eval")]
    metrics = dict.fromkeys(key[: -len(MEAN)] for record in evaluations for key in record if key.endswith(MEAN))
    if updates:  # the reward first, also when nothing was evaluated
        metrics = {"reward": None, **metrics}
    panels = []
    for metric in metrics:
        lines = [series(updates, metric + MEAN, "training batches"), series(evaluations, metric + MEAN, "evaluation")]
        lines = [line for line in lines if line.xs]
        if lines:
            panels.append(Panel(metric, "update", f"{metric} (mean)", lines))
    for key, title in (("grad_norm", "gradient norm (before clipping)"), ("lr", "learning rate")):
        line = series(updates, key)
        if line.xs:
            panels.append(Panel(title, "update", key, [line]))
    return panels


def save_curves(run_dir: Path) -> Path:
    """RUN/curves.png from RUN/metrics.jsonl; UserError when the log holds no update and no evaluation."""
    panels = curve_panels(read_records(run_dir))
    if not panels:
        raise UserError(f"{run_dir / METRICS_FILE} holds no update and no evaluation yet: nothing to draw")
    path = run_dir / CURVES_FILE
    save_panels(panels, path)
    return path


def save_curves_after_training(run_dir: Path) -> None:
    """The end of training: curves.png, a failure being a warning (the run itself has succeeded)."""
    try:
        save_curves(run_dir)
    except Exception as error:  # a plot is never worth failing a finished run for
        logger.warning("could not draw %s: %s", run_dir / CURVES_FILE, error)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """`RUN`: write RUN/curves.png; a bad input is one line `error: ...`, exit 2, nothing written."""
    parse = ArgumentParser(
        prog=prog or "python -m alignprop.curves", description="Draw RUN/curves.png from its metrics."
    )
    parse.add_argument("run", metavar="RUN", help="a training run directory (with metrics.jsonl)")
    try:
        run_dir = Path(parse.parse_args(argv).run)
        if not (run_dir / METRICS_FILE).is_file():
            raise UserError(f"{excerpt(str(run_dir))} holds no {METRICS_FILE}: give a training run directory")
        path = save_curves(run_dir)
    except UserError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        print(f"error: cannot write {run_dir / CURVES_FILE}: {error.strerror}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
