"""`alignprop compare`: evaluations written by the project's own writer -> the hand-computed means, standard errors
and paired differences; a reproducible bootstrap over prompts; mismatched evaluations refused in one line."""

import csv
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_runs import evaluated_run, straight_run

from alignprop import compare
from alignprop.evaluate import EvalResult, evaluation_context, write_evaluation

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "a blue square", "a green star"] * 2  # 3 prompts x 2 images, as eval_images_per_prompt=2
# Multiples of 1/4: exact in float32, so the summaries hold exactly these numbers.
REWARDS = {
    "base": [1.0, 2.0, 4.0, 3.0, 5.0, 6.5],
    "first_run": [1.5, 2.25, 4.5, 3.0, 6.0, 7.0],
    "second_run": [0.5, 2.5, 3.75, 3.5, 4.0, 6.0],
}
HELDOUT = {
    "base": [0.25, 0.5, 0.75, 0.5, 0.25, 1.0],
    "first_run": [0.5, 0.5, 1.0, 0.75, 0.25, 1.25],
    "second_run": [0.0, 0.75, 0.5, 0.5, 0.5, 0.75],
}


def write(directory: Path, preset, rewards, heldout=None, prompts=PROMPTS, size=8, **context):
    """An evaluation folder through `write_evaluation`, with the evaluate mode's context of the tiny preset."""
    config = preset("tiny")
    result = EvalResult(
        list(prompts),
        torch.zeros(len(prompts), 3, size, size),
        torch.tensor(rewards),
        {} if heldout is None else {"heldout_toy": torch.tensor(heldout)},
    )
    write_evaluation(result, directory, {**evaluation_context(config, None, "evaluate"), **context})
    return directory


@pytest.fixture
def three(preset, tmp_path):
    return [write(tmp_path / name, preset, REWARDS[name], HELDOUT[name]) for name in REWARDS]


def read_rows(directory: Path) -> dict:
    with (directory / "compare.csv").open() as file:
        return {(row["metric"], row["column"]): row for row in csv.DictReader(file)}


def mean(values):
    return sum(values) / len(values)


def standard_error(values):
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) / math.sqrt(len(values))


def refusal(capsys, arguments) -> str:
    """The one stderr line of a refused `compare.main(arguments)` (exit 2)."""
    with pytest.raises(SystemExit) as stop:
        compare.main(arguments)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_summary_records_what_pairing_needs(three):
    summary = json.loads((three[0] / "summary.json").read_text())
    assert summary["resolution"] == [8, 8]
    assert summary["eval_seeding"] == "sequential" and summary["seed"] == 42


def test_means_standard_errors_and_paired_differences_are_the_hand_computed_ones(preset, three, tmp_path, capsys):
    compare.main([str(path) for path in three] + ["--out", str(tmp_path / "out")])
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 2 * 3
    reward = f"reward ({preset('tiny').reward_fn})"  # the reward row is named by its reward_fn
    for metric, table in ((reward, REWARDS), ("heldout_toy", HELDOUT)):
        for name, values in table.items():
            row = rows[(metric, name)]
            assert float(row["mean"]) == pytest.approx(mean(values), abs=1e-12)
            assert float(row["standard_error"]) == pytest.approx(standard_error(values), abs=1e-12)
            assert int(row["images"]) == 6
            if name == "base":
                assert row["difference_vs_first"] == row["difference_low"] == ""
                continue
            paired = mean([v - b for v, b in zip(values, table["base"])])
            assert float(row["difference_vs_first"]) == pytest.approx(paired, abs=1e-12)
            assert float(row["difference_low"]) <= paired <= float(row["difference_high"])
    table = (tmp_path / "out" / "compare.md").read_text()
    paired = mean([v - b for v, b in zip(REWARDS["first_run"], REWARDS["base"])])
    assert f"| {reward} | {mean(REWARDS['base']):.4g} ± " in table
    assert f"| Δ vs base |  | {paired:+.3g} [" in table
    assert "6 images of 3 prompts (sequential, seed 42; 8 x 8)" in table
    assert (tmp_path / "out" / "compare.png").stat().st_size > 0
    assert capsys.readouterr().out.endswith(f"wrote compare.md, compare.csv, compare.png in {tmp_path / 'out'}\n")


def test_the_bootstrap_is_reproducible(three, tmp_path):
    for out in ("one", "two"):
        compare.main([str(path) for path in three] + ["--out", str(tmp_path / out)])
    for name in ("compare.csv", "compare.md", "compare.png"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_the_bootstrap_resamples_prompts_not_images():
    """Two images per prompt with the same difference: the interval is that of one image per prompt (whole
    prompts are drawn), not the narrower one of independent images."""
    draw = random.Random(0)
    per_prompt = np.array([draw.gauss(0.3, 1.0) for _ in range(50)])
    once = compare.paired_difference(per_prompt, np.zeros(50), np.arange(50))
    twice = compare.paired_difference(np.tile(per_prompt, 2), np.zeros(100), np.tile(np.arange(50), 2))
    assert twice == pytest.approx(once, abs=1e-12)
    as_images = compare.paired_difference(np.tile(per_prompt, 2), np.zeros(100), np.arange(100))
    assert as_images[2] - as_images[1] < 0.8 * (once[2] - once[1])  # ~1/sqrt(2) as wide: the wrong unit


def test_the_bootstrap_interval_matches_the_normal_one_on_a_large_sample():
    draw = random.Random(1)
    base = [draw.gauss(0, 1) for _ in range(400)]
    run = [b + draw.gauss(0.2, 0.5) for b in base]
    difference, low, high = compare.paired_difference(np.array(run), np.array(base), np.arange(400))
    differences = [r - b for r, b in zip(run, base)]
    half_width = 1.96 * standard_error(differences)
    assert difference == pytest.approx(mean(differences), abs=1e-12)
    assert low == pytest.approx(difference - half_width, abs=0.1 * half_width)
    assert high == pytest.approx(difference + half_width, abs=0.1 * half_width)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"prompts": ["a red circle", "a blue square", "a yellow star"] * 2}, "their prompts differ (image 2:"),
        ({"prompts": PROMPTS[:3]}, "their prompts differ (6 images vs 3)"),
        ({"eval_seeding": "per_prompt"}, "seeding differs (sequential, seed 42 vs per_prompt, seed 42)"),
        ({"seed": 7}, "seeding differs (sequential, seed 42 vs sequential, seed 7)"),
        ({"size": 16}, "resolution differs (8 x 8 vs 16 x 16)"),
    ],
)
def test_mismatched_evaluations_are_refused_in_one_line(preset, tmp_path, capsys, change, words):
    base = write(tmp_path / "base", preset, REWARDS["base"])
    prompts = change.pop("prompts", PROMPTS)
    other = write(tmp_path / "other", preset, REWARDS["first_run"][: len(prompts)], prompts=prompts, **change)
    line = refusal(capsys, [str(base), str(other), "--out", str(tmp_path / "out")])
    assert words in line and "cannot pair" in line
    assert not (tmp_path / "out").exists()


def test_what_is_not_an_evaluation_is_refused_in_one_line(preset, tmp_path, capsys):
    base = write(tmp_path / "base", preset, REWARDS["base"])
    samples = write(tmp_path / "samples", preset, REWARDS["base"], mode="train_samples")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    for argument, words in (
        (tmp_path / "missing", "holds no evaluation"),
        (samples, "holds training samples"),
        (tmp_path / "broken", "cannot read"),
    ):
        assert words in refusal(capsys, [str(base), str(argument), "--out", str(tmp_path / "out")])
    assert "unrecognized arguments" in refusal(capsys, [str(base), "--bins", "3"])
    assert not (tmp_path / "out").exists()


def test_a_training_run_is_its_last_evaluation_and_pairs_with_the_evaluate_mode(preset, tmp_path_factory, tmp_path):
    """The tiny run (evaluated before, after 2 and after 4 updates) and the evaluate mode on its final checkpoint:
    the same images as its last evaluation, so a difference of exactly 0."""
    run_dir = straight_run(preset, tmp_path_factory)
    evaluated, _ = evaluated_run(preset, tmp_path_factory)
    before = run_dir / "eval" / "update_000000"
    compare.main([str(before), str(run_dir), str(evaluated), "--out", str(tmp_path)])
    rows = read_rows(tmp_path)
    reward = f"reward ({json.loads((before / 'summary.json').read_text())['reward_fn']})"
    summaries = {
        f"{run_dir.name}@update_000000": before / "summary.json",
        f"{run_dir.name}@update_000004": run_dir / "eval" / "update_000004" / "summary.json",
        evaluated.name: evaluated / "summary.json",
    }
    for label, path in summaries.items():  # the summaries' means are float32 ones
        summary = json.loads(path.read_text())
        assert float(rows[(reward, label)]["mean"]) == pytest.approx(summary["reward_mean"], rel=1e-6)
        assert float(rows[("checker_shape", label)]["mean"]) == pytest.approx(summary["checker_shape_mean"], rel=1e-6)
    final, again = rows[(reward, f"{run_dir.name}@update_000004")], rows[(reward, evaluated.name)]
    assert final["difference_vs_first"] == again["difference_vs_first"]
    assert final["difference_low"] == again["difference_low"] and final["difference_high"] == again["difference_high"]


@pytest.mark.parametrize("command", [["-m", "alignprop.compare"], ["-m", "alignprop", "compare"]])
def test_the_command_line(three, tmp_path, command):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    arguments = [sys.executable, *command, str(three[0]), str(three[1]), "--out", str(tmp_path / "out")]
    done = subprocess.run(arguments, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| Δ vs base |" in done.stdout and (tmp_path / "out" / "compare.csv").is_file()
    (tmp_path / "empty").mkdir()
    refused = subprocess.run(  # without --out: it would write in the working directory
        [*arguments[:-2], str(tmp_path / "nothing")], capture_output=True, text=True, env=env, cwd=tmp_path / "empty"
    )
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1
    assert not any((tmp_path / "empty").iterdir())
