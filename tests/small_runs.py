"""Small, fast training configs for the tests of single behaviours (noise, schedules, training samples).

Not a test module: imported by them. The tiny preset with 4 DDIM steps, 2 samples per update in one pass,
2 updates per epoch, and an evaluation set of 2 held-out captions.
"""

from __future__ import annotations

from pathlib import Path

from alignprop.batching import plan_batches
from alignprop.rundir import create_run_dir
from alignprop.runtime import validate
from alignprop.train import Trainer

EVAL_PROMPTS = ["a red circle on a blue background", "a green square on a yellow background"]


def small_config(preset, tmp_path: Path, **overrides):
    config = preset("tiny")
    config.logdir = str(tmp_path / "logs")
    prompts = tmp_path / "eval_prompts.txt"
    prompts.write_text("\n".join(EVAL_PROMPTS) + "\n")
    config.eval_prompt_fn = str(prompts)
    config.steps = 4
    config.truncated_backprop_minmax = (0, 4)
    config.trunc_backprop_timestep = 3
    config.num_epochs = 2
    config.save_freq = 0
    config.train.total_samples_per_epoch = 4
    config.train.total_batch_size = 2
    config.train.batch_size_per_gpu_available = 2
    for key, value in overrides.items():
        node, *path = key.split(".")
        target = config
        for part in [node, *path][:-1]:
            target = target[part]
        target[[node, *path][-1]] = value
    return config


def make_trainer(config, session=None) -> Trainer:
    batches = validate(config, num_processes=1)
    return Trainer(config, batches, create_run_dir(config.logdir, config.run_name), session)


def updates_of(config) -> int:
    return config.num_epochs * plan_batches(config.train, 1).updates_per_epoch


def assert_one_line_before_the_run_directory(config, tmp_path: Path, words: str) -> None:
    """`validate` refuses `config` with one line containing `words`, before anything exists under tmp_path/logs."""
    import pytest

    from alignprop.errors import UserError

    with pytest.raises(UserError) as error:
        validate(config, num_processes=1)
    message = str(error.value)
    assert words in message and "\n" not in message, message
    assert not (tmp_path / "logs").exists()
