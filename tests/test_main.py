"""The command line: the README's demo command, and one clear line for every bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_main(*args, cwd=ROOT, timeout=300):
    command = [sys.executable, str(ROOT / "main.py"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


BAD_INPUTS = {
    "unknown preset": (["--config", "config/align_prop.py:aesthetics"], "unknown preset"),
    "unknown key": (["--config.no_such_key=1"], "unknown config key"),
    "unknown nested key": (["--config.train.no_such_key=1"], "unknown config key"),
    "bad value type": (["--config.steps=many"], "config.steps"),
    "missing config file": (["--config", "config/missing.py:tiny"], "No such file"),
    "unknown reward": (["--config.reward_fn=beauty"], "unknown reward_fn"),
    "unknown prompt set": (["--config.prompt_fn=animals"], "unknown prompt set"),
    "missing prompt file": (["--config.prompt_fn=/nonexistent/prompts.txt"], "does not exist"),
    "indivisible batch": (["--config.train.total_batch_size=6"], "multiple of train.total_batch_size"),
    "capacity does not divide": (["--config.train.batch_size_per_gpu_available=3"], "batch_size_per_gpu_available"),
    "cut out of range": (["--config.truncation_strategy=fixed", "--config.trunc_backprop_timestep=11"], "[0, steps"),
    "gaussian never fits": (["--config.truncation_strategy=gaussian"], "almost never"),
    "unknown strategy": (["--config.truncation_strategy=random"], "unknown truncation strategy"),
    "retired model id": (["--config.pretrained.model=runwayml/stable-diffusion-v1-5"], "stable-diffusion-v1-5/"),
    "unknown precision": (["--config.mixed_precision=fp8"], "mixed_precision"),
    "unknown tracker": (["--config.tracker=mlflow"], "tracker"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_writes_nothing(case, tmp_path):
    args, fragment = BAD_INPUTS[case]
    if args[0] != "--config":
        args = ["--config", "config/align_prop.py:tiny", *args]
    logdir = tmp_path / "logs"
    result = run_main(*args, f"--config.logdir={logdir}" if "missing config" not in case else "")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not logdir.exists(), "a configuration error must not create anything under logdir"


def test_readme_demo_command(tmp_path):
    result = run_main("--config", "config/align_prop.py:tiny", f"--config.logdir={tmp_path}", "--config.run_name=demo")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "before: reward_mean=" in result.stdout and "after: reward_mean=" in result.stdout
    assert "jpeg_kb_mean" in result.stdout
    run_dir = tmp_path / "demo"
    for name in ("config.json", "metrics.jsonl", "before_after.png"):
        assert (run_dir / name).exists(), name
