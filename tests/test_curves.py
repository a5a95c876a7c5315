"""RUN/curves.png: drawn at the end of training and on demand, plotting exactly the values of metrics.jsonl."""

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_runs import read_metrics, straight_run
from PIL import Image

from alignprop import curves, plot
from alignprop.errors import UserError

ROOT = Path(__file__).resolve().parent.parent

# A log as training writes it: a resume note, evaluations (update 0, 2, 3) and updates 1..3 (update 2 skipped as
# non-finite: its gradient norm is NaN), then a last line cut short by a kill.
LOG = [
    {"update": 0, "resumed_from": "logs/a/checkpoints/checkpoint_1", "completed_epochs": 1},
    {"update": 0, "eval": True, "reward_mean": 0.5, "reward_std": 0.1, "heldout_hps_mean": 0.2, "heldout_hps_std": 0},
    {"epoch": 0, "update": 1, "reward_mean": 0.25, "loss": -0.25, "grad_norm": 2.0, "lr": 0.0, "part_mean": 1.5},
    {"epoch": 0, "update": 2, "reward_mean": 0.75, "loss": -0.75, "grad_norm": math.nan, "lr": 5e-4, "part_mean": 2.5},
    {"update": 2, "eval": True, "reward_mean": 0.625, "reward_std": 0.1, "heldout_hps_mean": 0.25, "part_mean": 2.0},
    {"epoch": 1, "update": 3, "reward_mean": 1.0, "loss": -1.0, "grad_norm": 1.0, "lr": 1e-3, "part_mean": 3.0},
    {"update": 3, "eval": True, "reward_mean": 0.875, "reward_std": 0.1, "heldout_hps_mean": 0.3, "part_mean": 2.75},
    {"update": 3, "weights_sha256_per_process": ["ab"]},
]


def write_log(run_dir: Path, records, cut_short: bool = True) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record) + "\n" for record in records)
    (run_dir / "metrics.jsonl").write_text(text + ('{"update": 4, "rew' if cut_short else ""))
    return run_dir


def plotted(panels) -> dict:
    """{panel title: {series label: [(x, y), ...]}}."""
    return {panel.title: {s.label: list(zip(s.xs, s.ys)) for s in panel.series} for panel in panels}


def expected(records) -> dict:
    """What curves.png must show, worked out from the records directly."""
    updates = [r for r in records if "loss" in r]
    evaluations = [r for r in records if r.get("eval")]
    points = lambda rows, key: [(r["update"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
    shown = {}
    for name in ["reward"] + [k[:-5] for r in evaluations for k in r if k.endswith("_mean") and k != "reward_mean"]:
        lines = {"training batches": points(updates, f"{name}_mean"), "evaluation": points(evaluations, f"{name}_mean")}
        shown[name] = {label: values for label, values in lines.items() if values}
    shown["gradient norm (before clipping)"] = {"": points(updates, "grad_norm")}
    shown["learning rate"] = {"": points(updates, "lr")}
    return shown


def test_the_curves_are_the_logged_values(tmp_path):
    run_dir = write_log(tmp_path / "run", LOG)
    panels = curves.curve_panels(curves.read_records(run_dir))
    assert plotted(panels) == expected(LOG)
    assert plotted(panels)["gradient norm (before clipping)"] == {"": [(1, 2.0), (3, 1.0)]}  # NaN not drawn
    titles = ["reward", "heldout_hps", "part", "gradient norm (before clipping)", "learning rate"]
    assert list(plotted(panels)) == titles
    path = curves.save_curves(run_dir)
    assert path == run_dir / "curves.png"
    assert Image.open(path).size == (2 * plot.WIDTH, 3 * plot.HEIGHT)  # 5 panels, 2 per row


def test_a_line_that_is_not_json_before_the_last_is_refused(tmp_path):
    run_dir = write_log(tmp_path / "run", LOG[:3], cut_short=False)
    with (run_dir / "metrics.jsonl").open("a") as file:
        file.write("garbage\n" + json.dumps(LOG[3]) + "\n")
    with pytest.raises(UserError, match="line 4 is not JSON"):
        curves.save_curves(run_dir)
    assert not (run_dir / "curves.png").exists()


def test_training_draws_the_curves_of_its_log(preset, tmp_path_factory):
    """The tiny run (4 updates, evaluated at 0, 2 and 4) left curves.png; its panels are its log's values."""
    run_dir = straight_run(preset, tmp_path_factory)
    records = read_metrics(run_dir)
    assert Image.open(run_dir / "curves.png").size[0] == 2 * plot.WIDTH
    panels = plotted(curves.curve_panels(records))
    assert panels == expected(records)
    assert [x for x, _ in panels["reward"]["training batches"]] == [1, 2, 3, 4]
    assert [x for x, _ in panels["reward"]["evaluation"]] == [0, 2, 4]
    assert "checker_shape" in panels  # the toy reward's parts, at every evaluation


def test_a_plotting_failure_at_the_end_of_training_is_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="alignprop.curves"):
        curves.save_curves_after_training(tmp_path)  # no metrics.jsonl
    assert "could not draw" in caplog.text and not (tmp_path / "curves.png").exists()


@pytest.mark.parametrize("command", [["-m", "alignprop.curves"], ["-m", "alignprop", "curves"]])
def test_the_command_line(tmp_path, command):
    run_dir = write_log(tmp_path / "run", LOG)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, *command, str(run_dir)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {run_dir / 'curves.png'}\n" and (run_dir / "curves.png").is_file()
    for bad in (tmp_path / "missing", write_log(tmp_path / "empty", [], cut_short=False)):
        refused = subprocess.run([sys.executable, *command, str(bad)], capture_output=True, text=True, env=env)
        assert refused.returncode == 2 and refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1
        assert not (bad / "curves.png").exists()
