"""eval_all_checkpoints: the base model and every checkpoint of a run, each evaluated as the evaluate mode would,
one table and curves; continued after an interruption without redoing finished evaluations; bad inputs one line."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from alignprop import compare, jobs
from alignprop.errors import UserError
from alignprop.pause import PAUSE_ENV
from tests.checkpoint_runs import run, tiny_config

ROOT = Path(__file__).resolve().parent.parent
SWEEP = {"only_eval": True, "eval_all_checkpoints": True}
PROMPTS = [
    "a red circle on a blue background",
    "a green square on a yellow background",
    "a blue triangle on a white background",
]


def small(preset, logdir: Path, finetune: str = "lora", **overrides):
    """tiny with 4 DDIM steps, 2 updates of 2 samples per epoch, 3 held-out prompts; no evaluation during training."""
    prompts = logdir / "eval_prompts.txt"
    logdir.mkdir(parents=True, exist_ok=True)
    prompts.write_text("\n".join(PROMPTS) + "\n")
    config = tiny_config(preset, logdir, eval_prompt_fn=str(prompts), steps=4, save_freq=1, **overrides)
    config.truncated_backprop_minmax, config.trunc_backprop_timestep = (0, 4), 3
    config.visualize_eval = False
    config.train.total_samples_per_epoch, config.train.total_batch_size = 4, 2
    config.train.batch_size_per_gpu_available = 2
    config.train.finetune = finetune
    return config


# `small` as command-line overrides (the sweep's evaluation reads these), for a subprocess of main.py
SWEEP_ARGS = {
    "vis_freq": 0,
    "steps": 4,
    "save_freq": 1,
    "truncated_backprop_minmax": "0,4",
    "trunc_backprop_timestep": 3,
    "visualize_eval": False,
    "train.total_samples_per_epoch": 4,
    "train.total_batch_size": 2,
    "train.batch_size_per_gpu_available": 2,
    "only_eval": True,
    "eval_all_checkpoints": True,
}


@pytest.fixture(scope="module")
def lora_run(preset, tmp_path_factory):
    """A LoRA run with a moving average, checkpoints after epochs 1 and 2 (updates 2 and 4), and its sweep."""
    logdir = tmp_path_factory.mktemp("lora")
    config = small(preset, logdir, run_name="trained", num_epochs=2)
    config.train.ema_decay = 0.5
    trained, _ = run(config)
    sweep, rows = run(small(preset, logdir, only_eval=True, eval_all_checkpoints=True, resume_from=str(trained)))
    return logdir, trained, sweep, rows


def summary(directory: Path) -> dict:
    return json.loads((directory / "summary.json").read_text())


def normal_evaluation(preset, logdir: Path, name: str, source: str) -> dict:
    return summary(run(small(preset, logdir, run_name=name, only_eval=True, resume_from=source))[0])


def table(sweep: Path) -> list[dict]:
    with open(sweep / "table.csv", newline="") as file:
        return list(csv.DictReader(file))


def assert_rows_match(rows: list[dict], name: str, expected: dict) -> None:
    """`name`'s rows hold the mean and standard error of every per-image number of the summary `expected`."""
    mine = {row["metric"]: row for row in rows if row["checkpoint"] == name}
    values = {"reward (toyworld_shape)": [image["reward"] for image in expected["images"]]}
    values |= {key: [image[key] for image in expected["images"]] for key in expected["images"][0] if "checker" in key}
    assert values.keys() <= mine.keys() and len(values) > 1
    for metric, numbers in values.items():
        numbers = np.array(numbers, dtype=float)
        assert float(mine[metric]["mean"]) == pytest.approx(numbers.mean(), rel=1e-12, abs=1e-15)
        error = numbers.std(ddof=1) / math.sqrt(len(numbers))
        assert float(mine[metric]["standard_error"]) == pytest.approx(error, rel=1e-9, abs=1e-15)


def test_every_checkpoint_in_update_order_equals_its_own_evaluation(preset, lora_run):
    logdir, trained, sweep, _ = lora_run
    assert sweep == logdir / "trained_checkpoints"
    rows = table(sweep)
    order = list(dict.fromkeys((row["checkpoint"], row["update"]) for row in rows))
    assert order == [("base", "0"), ("checkpoint_1", "2"), ("checkpoint_2", "4")]
    header = (sweep / "table.md").read_text().splitlines()[0]
    assert header.index("base (update 0)") < header.index("checkpoint_1 (update 2)") < header.index("checkpoint_2")
    assert (sweep / "curves.png").stat().st_size > 0
    for name, source in [
        ("base", "base"),
        *((c, str(trained / "checkpoints" / c)) for c in ("checkpoint_1", "checkpoint_2")),
    ]:
        alone = normal_evaluation(preset, logdir, f"alone_{name}", source)
        swept = summary(sweep / name)
        assert [image["reward"] for image in swept["images"]] == [image["reward"] for image in alone["images"]]
        assert (
            swept["lora"] == alone["lora"]
            and swept["update"] == {"base": 0, "checkpoint_1": 2, "checkpoint_2": 4}[name]
        )
        assert_rows_match(rows, name, alone)
    assert summary(sweep / "checkpoint_2")["lora"].endswith("ema/pytorch_lora_weights.safetensors")
    rewards = {name: summary(sweep / name)["reward_mean"] for name in ("base", "checkpoint_1", "checkpoint_2")}
    assert len(set(rewards.values())) == 3  # each really evaluated other weights
    # any two of them pair up in `alignprop compare` (same prompts, noise and resolution)
    compare.main([str(sweep / "base"), str(sweep / "checkpoint_2"), "--out", str(logdir / "compared")])
    assert "checkpoint_2" in (logdir / "compared" / "compare.md").read_text()


def test_an_interrupted_sweep_continues_without_redoing_finished_ones(preset, lora_run):
    logdir, trained, sweep, _ = lora_run
    copy = logdir / "interrupted"
    shutil.copytree(sweep, copy)
    # as a kill during checkpoint_2's evaluation leaves it: its images written, no completion marker, no table
    (copy / "checkpoint_2" / "evaluated.json").unlink()
    (copy / "checkpoint_2" / "summary.json").write_text("{}")
    for name in ("table.md", "table.csv", "curves.png"):
        (copy / name).unlink()
    finished = {name: (copy / name / "summary.json").stat().st_mtime_ns for name in ("base", "checkpoint_1")}
    again, _ = run(
        small(
            preset, logdir, run_name="interrupted", only_eval=True, eval_all_checkpoints=True, resume_from=str(trained)
        )
    )
    assert again == copy
    assert {name: (copy / name / "summary.json").stat().st_mtime_ns for name in finished} == finished
    assert summary(copy / "checkpoint_2") == {**summary(sweep / "checkpoint_2")}
    assert table(copy) == table(sweep)


def test_a_sweep_killed_after_a_checkpoint_continues_there(preset, lora_run):
    """SIGKILL right after checkpoint_1's evaluation finished (the pause hook), then the same command again: base and
    checkpoint_1 are kept as they were, checkpoint_2 is evaluated, and the table is the uninterrupted sweep's."""
    logdir, trained, sweep, _ = lora_run
    args = [f"--config.{key}={value}" for key, value in SWEEP_ARGS.items()]
    args += [f"--config.logdir={logdir}", "--config.run_name=killed", f"--config.resume_from={trained}"]
    args.append(f"--config.eval_prompt_fn={logdir / 'eval_prompts.txt'}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", PAUSE_ENV: "evaluated_checkpoint_1:120"}
    command = [sys.executable, str(ROOT / "main.py"), "--config", "config/align_prop.py:tiny", *args]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed, deadline = logdir / "killed", time.monotonic() + 120
    while not (killed / "checkpoint_1" / "evaluated.json").is_file():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "timed out waiting for checkpoint_1's evaluation"
        time.sleep(0.05)
    process.kill()
    process.communicate()
    assert not (killed / "checkpoint_2").exists() and not (killed / "table.csv").exists()
    finished = {name: (killed / name / "summary.json").stat().st_mtime_ns for name in ("base", "checkpoint_1")}
    config = small(preset, logdir, run_name="killed", resume_from=str(trained), **SWEEP)
    assert run(config)[0] == killed
    assert {name: (killed / name / "summary.json").stat().st_mtime_ns for name in finished} == finished
    assert table(killed) == table(sweep)


def test_a_full_fine_tuning_run(preset, tmp_path):
    trained, _ = run(small(preset, tmp_path, run_name="full", num_epochs=2, finetune="full"))
    sweep, _ = run(small(preset, tmp_path, only_eval=True, eval_all_checkpoints=True, resume_from=str(trained)))
    # checkpoint_2 evaluated after checkpoint_1's denoiser was loaded: nothing of it may remain
    alone = normal_evaluation(preset, tmp_path, "alone", str(trained / "checkpoints" / "checkpoint_2"))
    assert [image["reward"] for image in summary(sweep / "checkpoint_2")["images"]] == [
        image["reward"] for image in alone["images"]
    ]
    assert summary(sweep / "checkpoint_2")["lora"].endswith("checkpoint_2/unet")
    assert [row["checkpoint"] for row in table(sweep)][:3] == ["base", "checkpoint_1", "checkpoint_2"]


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"only_eval": False}, "add --config.only_eval=True"),
        ({"soup_inference": True}, "drop soup_inference"),
        ({"resume_from": "base"}, "needs --config.resume_from=<a training run directory>"),
        ({"resume_from": "CHECKPOINT"}, "needs --config.resume_from=<a training run directory>"),
        ({"resume_from": "EMPTY"}, "holds no complete checkpoint"),
        ({"run_name": "OTHER"}, "is not an evaluation of every checkpoint"),
        ({"run_name": "trained_checkpoints", "seed": 7}, "with other settings (seed)"),
    ],
)
def test_bad_inputs_are_one_line_and_write_nothing(preset, lora_run, tmp_path, overrides, words):
    logdir, trained, _, _ = lora_run
    (tmp_path / "EMPTY" / "checkpoints").mkdir(parents=True)
    (tmp_path / "OTHER").mkdir()
    (tmp_path / "OTHER" / "summary.json").write_text("{}")  # some other run
    places = {"CHECKPOINT": str(trained / "checkpoints" / "checkpoint_1"), "EMPTY": str(tmp_path / "EMPTY")}
    overrides = {key: places.get(value, value) for key, value in overrides.items()}
    continued = overrides.get("run_name") == "trained_checkpoints"  # lora_run's finished sweep, with another seed
    where = logdir if continued else tmp_path
    config = small(preset, where, only_eval=True, eval_all_checkpoints=True, resume_from=str(trained))
    config.update(overrides)
    before = sorted(Path(config.logdir).rglob("*"))
    with pytest.raises(UserError) as error:
        jobs.prepare(config, num_processes=1)
    assert words in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert sorted(Path(config.logdir).rglob("*")) == before
