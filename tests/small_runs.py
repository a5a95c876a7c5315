"""Small, fast training configs for the tests of single behaviours (noise, schedules, training samples).

Not a test module: imported by them. The tiny preset with 4 DDIM steps, 2 samples per update in one pass,
2 updates per epoch, and an evaluation set of 2 held-out captions.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from alignprop.batching import plan_batches
from alignprop.rewards import RewardResult
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


class SmoothReward(torch.nn.Module):
    """A smooth image loss in any dtype (the toy-world reward's classifier is float32)."""

    def score(self, images, prompts):
        loss = (images - 0.3).square().mean(dim=(1, 2, 3))
        return RewardResult(loss, -loss.detach())


def one_update_runner(config):
    """A float64 trainer (non-zero LoRA B factors, `SmoothReward`, float64 latents) and run(path, chunk): one update
    from the same weights and stream states with gradient path `path` and train.no_grad_batch_size=chunk, returning
    (the LoRA gradients before clipping, the update's record, the stream states after)."""
    trainer = make_trainer(config)
    trainer.model.pipeline.to(torch.float64)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in trainer.denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.05)
    trainer.reward = SmoothReward()
    draw = trainer.draw_micro_batch
    trainer.draw_micro_batch = lambda: (lambda batch: replace(batch, latents=batch.latents.double()))(draw())
    captured = {}
    trainer.synchronize_gradients = lambda: captured.update(
        grads=[p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainer.params]
    )
    weights = [p.detach().clone() for p in trainer.params]
    streams = trainer.random.state_dict()

    def run(path, chunk: int):
        with torch.no_grad():
            for param, saved in zip(trainer.params, weights):
                param.copy_(saved)
        trainer.random.load_state_dict(streams)
        trainer.path = path
        trainer.config.train.no_grad_batch_size = chunk
        record = trainer.train_update()
        return captured["grads"], record, trainer.random.state_dict()

    return trainer, run
