"""original_training_noise: the original's training latents (issue 12, point 3).

The original reseeded the generator its training latents came from with `seed` in every evaluation, the same
on every process, and drew the evaluation's latents from it first: with vis_freq=1 every update after the first drew
the same latents (those after the evaluation's) on every GPU. The switch reproduces that (what exactly is drawn:
tests/test_fidelity_second_pass.py); off (the default outside the paper presets), every update and every process
draws fresh latents.
"""

import pytest
import torch
from small_runs import make_trainer, small_config

from alignprop.randomness import RandomStreams


def latents_per_update(trainer) -> list[torch.Tensor]:
    """Run the trainer's whole fit and return the starting latents of every update (one micro-batch each)."""
    drawn = []
    draw = trainer.draw_micro_batch

    def recording():
        batch = draw()
        drawn.append(batch.latents.clone())
        return batch

    trainer.draw_micro_batch = recording
    trainer.fit()
    return drawn


@pytest.fixture(scope="module")
def processes(preset, tmp_path_factory):
    """Latents of 4 updates with the switch on, as process 0 and as (a simulated) process 1; and switch off."""
    tmp = tmp_path_factory.mktemp("noise")
    config = small_config(preset, tmp, original_training_noise=True, vis_freq=1)
    first = make_trainer(config)
    process_0 = latents_per_update(first)
    second = make_trainer(small_config(preset, tmp, original_training_noise=True, vis_freq=1))
    second.random = RandomStreams.seeded(config.seed, process_index=1)  # what process 1 of a launch draws from
    process_1 = latents_per_update(second)
    default = latents_per_update(make_trainer(small_config(preset, tmp, vis_freq=1)))
    return process_0, process_1, default


def test_every_update_after_the_first_draws_the_same_latents(processes):
    process_0, _, _ = processes
    assert len(process_0) == 4
    assert not torch.equal(process_0[0], process_0[1])  # the first update: before any evaluation reseeded
    for later in process_0[2:]:
        assert torch.equal(later, process_0[1])


def test_the_same_latents_on_every_process(processes):
    process_0, process_1, _ = processes
    assert not torch.equal(process_0[0], process_1[0])  # per-process streams until the first evaluation
    for mine, theirs in zip(process_0[1:], process_1[1:]):
        assert torch.equal(mine, theirs)


def test_default_draws_fresh_latents_every_update(processes):
    process_0, _, default = processes
    assert torch.equal(default[0], process_0[0])  # the switch changes nothing before the first evaluation
    for earlier, later in zip(default, default[1:]):
        assert not torch.equal(earlier, later)


def test_without_evaluations_in_the_loop_nothing_is_reseeded(preset, tmp_path):
    """The original reseeded inside its evaluation: vis_freq=0 (before and after only) draws fresh latents."""
    drawn = latents_per_update(make_trainer(small_config(preset, tmp_path, original_training_noise=True, vis_freq=0)))
    for earlier, later in zip(drawn, drawn[1:]):
        assert not torch.equal(earlier, later)
