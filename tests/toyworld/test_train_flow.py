"""train_flow's random draws (which scenes, how much T5 padding, which noise levels) and its model growth."""

import math

import pytest
import torch

from alignprop.toyworld.build import FLOW_STAGES
from alignprop.toyworld.components_flow import build_transformer, deepen
from alignprop.toyworld.data import Dataset
from alignprop.toyworld.train_flow import draw_scenes, parse_args, sample_padding, sample_sigmas, shape_weights
from alignprop.toyworld.world import random_scenes


def scenes_only(count: int) -> Dataset:
    scenes = random_scenes(count, seed=0)
    return Dataset(scenes, torch.empty(0), [""] * count)


def drawn_shapes(data: Dataset, weights, draws: int = 6000) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    indices = draw_scenes(shape_weights(data, weights), draws, generator)
    shapes = [data.scenes[i].shape for i in indices.tolist()]
    return {shape: shapes.count(shape) / draws for shape in ("circle", "square", "triangle")}


def test_shape_weights_set_how_often_each_shape_is_drawn():
    data = scenes_only(600)
    assert drawn_shapes(data, (0, 1, 0)) == {"circle": 0.0, "square": 1.0, "triangle": 0.0}
    uniform, favoured = drawn_shapes(data, (1, 1, 1)), drawn_shapes(data, (1, 2, 1))
    assert all(abs(share - 1 / 3) < 0.05 for share in uniform.values())
    assert abs(favoured["square"] - 0.5) < 0.05 and abs(favoured["circle"] - 0.25) < 0.05


def test_shape_weights_default_to_uniform_and_take_one_number_per_shape():
    assert parse_args([]).shape_weights == (1.0, 1.0, 1.0)
    assert parse_args(["--shape-weights", "1", "3", "1"]).shape_weights == [1.0, 3.0, 1.0]
    with pytest.raises(SystemExit):
        parse_args(["--shape-weights", "1", "3"])


def test_padding_counts_are_log_uniform_integers_in_range():
    counts = sample_padding(20000, 1, 256, torch.Generator().manual_seed(0))
    assert counts.min() == 1 and counts.max() == 256 and torch.equal(counts, counts.floor())
    # Log-uniform: each octave [2^k, 2^(k+1)) holds about the same share (1/8 of the draws for 1..256).
    below_16 = (counts < 16).float().mean().item()
    assert abs(below_16 - math.log(16) / math.log(257)) < 0.02


def test_sigmas_are_logit_normal_or_uniform_and_shifted_as_the_scheduler_shifts():
    generator = torch.Generator().manual_seed(0)
    lognorm = sample_sigmas(20000, 1.0, generator, "lognorm")
    assert 0 < lognorm.min() and lognorm.max() < 1 and abs(lognorm.median().item() - 0.5) < 0.02
    # Logit-normal(0, 1): the logits have unit spread; uniform has none of that concentration.
    assert abs(torch.logit(lognorm).std().item() - 1) < 0.03
    uniform = sample_sigmas(20000, 1.0, torch.Generator().manual_seed(0), "uniform")
    assert abs((uniform < 0.1).float().mean().item() - 0.1) < 0.01
    unshifted = sample_sigmas(5, 1.0, torch.Generator().manual_seed(1))
    shifted = sample_sigmas(5, 3.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(shifted, 3 * unshifted / (1 + 2 * unshifted))


def test_build_recipe_stages_are_train_flow_command_lines_on_fresh_scenes():
    stages = [parse_args(arguments.split()) for arguments in FLOW_STAGES]
    seeds = [parse_args([]).seed, *(stage.seed for stage in stages)]
    assert len(set(seeds)) == len(seeds)  # each stage renders scenes (and noise) the others never saw


def test_deepen_inserts_pass_through_blocks_that_then_learn():
    torch.manual_seed(0)
    shallow = build_transformer(layers=3, heads=2, head_dim=8, text_width=16)
    with torch.no_grad():  # make the adaLN modulations non-trivial, as a trained model's are
        for parameter in shallow.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    deeper = deepen(shallow, 2)
    assert deeper.config.num_layers == 5 and shallow.config.num_layers == 3
    # The last block (the only one that skips the context update) stays last.
    assert deeper.transformer_blocks[-1].context_pre_only and not deeper.transformer_blocks[2].context_pre_only
    generator = torch.Generator().manual_seed(1)
    inputs = (
        torch.randn(2, 4, 8, 8, generator=generator),
        torch.randn(2, 5, 32, generator=generator),
        torch.randn(2, 32, generator=generator),
        torch.tensor([100.0, 800.0]),
    )
    with torch.no_grad():
        assert torch.equal(deeper(*inputs).sample, shallow(*inputs).sample)
    # Zero gates, but not a dead end: the gates' modulation gets gradient, so training grows the new blocks.
    deeper(*inputs).sample.square().mean().backward()
    assert deeper.transformer_blocks[2].norm1.linear.weight.grad.abs().sum() > 0


def test_add_layers_needs_a_model_to_deepen(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--add-layers", "2"])
    assert "--init" in capsys.readouterr().err
