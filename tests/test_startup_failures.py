"""What can only fail once the model is loaded fails before anything stays under logdir; the non-finite guard
also covers the weights a step produces and the optimizer state a checkpoint brings."""

import shutil

import pytest
import torch
from checkpoint_runs import run, straight_run, tiny_config

from alignprop import checkpoint, jobs
from alignprop.errors import UserError
from alignprop.rundir import create_run_dir
from alignprop.runtime import validate
from alignprop.train import Trainer


def test_lora_targets_the_model_lacks_leave_nothing_under_logdir(preset, tmp_path):
    config = tiny_config(preset, tmp_path / "logs", num_epochs=1)
    config.lora.target_modules = ("nope",)
    with pytest.raises(UserError, match="LoRA"):
        run(config)
    assert not any((tmp_path / "logs").iterdir())


def test_prompts_the_reward_cannot_read_leave_nothing_under_logdir(preset, tmp_path):
    config = tiny_config(preset, tmp_path / "logs", num_epochs=1, eval_prompt_fn="eval_simple_animals")
    with pytest.raises(UserError):  # the toy world's shape reward parses toy-world captions only
        run(config)
    assert not any((tmp_path / "logs").iterdir())


def broken_checkpoint(preset, tmp_path_factory, tmp_path, edit):
    source = checkpoint.resolve(str(straight_run(preset, tmp_path_factory)))
    copy = tmp_path / "run" / "checkpoints" / source.path.name
    shutil.copytree(source.path, copy)
    state = torch.load(copy / checkpoint.STATE_FILE, weights_only=True)
    checkpoint.write_training_state(copy, edit(state))
    return copy


def nan_moments(state):
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"][0] = float("nan")
    return state


@pytest.mark.parametrize(
    "edit, message", [(lambda state: {}, "lacks epoch"), (nan_moments, "optimizer state .* holds NaN")]
)
def test_a_broken_training_state_is_refused_before_the_run(preset, tmp_path_factory, tmp_path, edit, message):
    saved = broken_checkpoint(preset, tmp_path_factory, tmp_path, edit)
    config = tiny_config(preset, tmp_path / "logs", num_epochs=3, save_freq=1, resume_from=str(saved))
    with pytest.raises(UserError, match=message):
        jobs.prepare(config, num_processes=1)


def test_a_step_that_makes_the_weights_nonfinite_is_undone(preset, tmp_path):
    config = tiny_config(preset, tmp_path / "logs", num_epochs=1)
    trainer = Trainer(config, validate(config, 1), create_run_dir(config.logdir, "guard"))
    trainer.train_update()
    trainer.train_update()  # Adam has state now
    before = [p.detach().clone() for p in trainer.params]
    moments = {k: v.clone() for k, v in next(iter(trainer.optimizer.state_dict()["state"].values())).items()}
    step = trainer.optimizer.step

    def poisoned_step(*args, **kwargs):
        step(*args, **kwargs)
        with torch.no_grad():
            trainer.params[0].fill_(float("inf"))

    trainer.optimizer.step = poisoned_step
    record = trainer.train_update()
    assert record["skipped_nonfinite"] and record["nonfinite_count"] == 1 and trainer.guard.in_a_row == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    restored = next(iter(trainer.optimizer.state_dict()["state"].values()))
    assert all(torch.equal(restored[k], v) for k, v in moments.items())


def test_an_option_the_family_cannot_honour_is_refused_before_the_run(preset, tmp_path):
    config = tiny_config(preset, tmp_path / "logs", num_epochs=1, eta=0.5, reward_fn="compressibility")
    config.pretrained.model = "tiny_sd3"
    config.prompt_fn = config.eval_prompt_fn = "eval_simple_animals"
    with pytest.raises(UserError, match="eta=0.5 is DDIM's noise level"):
        run(config)
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
