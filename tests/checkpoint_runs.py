"""Tiny runs shared by the train / checkpoint / resume / evaluate / soup / interop / toy-world tests (each made
once per session).

Not a test module: imported by them. The runs go through `alignprop.jobs.run_job`, the same path as main.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignprop import jobs

_CACHE: dict[str, tuple] = {}


def tiny_config(preset, logdir: Path, **overrides):
    """The tiny preset, writing under `logdir`, with evaluations only before and after training."""
    config = preset("tiny")
    config.logdir = str(logdir)
    config.vis_freq = 0
    config.update(overrides)
    return config


def run(config):
    """(run_dir, result) of one invocation, exactly as main.py would do it."""
    _, run_dir, result = jobs.run_job(config)
    return run_dir, result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _once(name: str, make):
    if name not in _CACHE:
        _CACHE[name] = make()
    return _CACHE[name]


# Checkpoint after every epoch; evaluate every 2 updates, keeping 1 image of each evaluation.
CADENCE = {"save_freq": 1, "vis_freq": 2, "max_vis_images": 1}


def straight_run(preset, tmp_path_factory) -> Path:
    """Two epochs (4 updates) with a checkpoint after each: logs/straight/checkpoints/checkpoint_{1,2}."""
    logdir = tmp_path_factory.mktemp("straight")
    config = tiny_config(preset, logdir, run_name="straight", num_epochs=2, **CADENCE)
    return _once("straight", lambda: run(config)[0])


def evaluated_run(preset, tmp_path_factory):
    """The evaluate mode on the straight run's newest checkpoint: (run_dir, EvalResult)."""
    source = straight_run(preset, tmp_path_factory)
    logdir = tmp_path_factory.mktemp("evaluate")
    config = tiny_config(preset, logdir, run_name="evaluate", only_eval=True, resume_from=str(source))
    return _once("evaluate", lambda: run(config))


def demo_run(preset, tmp_path_factory):
    """The tiny preset exactly as the CPU demo runs it: (config, run_dir, (before, after) evaluations)."""
    config = preset("tiny")
    config.logdir, config.run_name = str(tmp_path_factory.mktemp("demo")), "demo"
    return _once("demo", lambda: (config, *run(config)))


def straight_and_resumed(config_for, logdir: Path) -> dict:
    """`config_for(logdir, **overrides)` run two epochs straight ("straight"), one epoch ("first"), then resumed from it
    up to two ("second"), each run's directory; and the evaluate mode on the straight run ("evaluate": its run
    directory and result). The runs an exact-resume test compares."""
    straight, _ = run(config_for(logdir, run_name="straight", num_epochs=2))
    first, _ = run(config_for(logdir, run_name="first", num_epochs=1))
    second, _ = run(config_for(logdir, run_name="second", num_epochs=2, resume_from=str(first)))
    evaluated = run(config_for(logdir, run_name="evaluate", only_eval=True, resume_from=str(straight)))
    return {"straight": straight, "first": first, "second": second, "evaluate": evaluated}
