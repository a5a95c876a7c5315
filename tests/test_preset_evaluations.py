"""The big presets evaluate on a held-out set that measures something, and the README's table of every training
preset's evaluation is what `experiments.preset_evaluations` computes from config/align_prop.py."""

import pytest

from alignprop import evaluate, jobs
from alignprop.batching import plan_batches
from alignprop.prompts import load_prompts
from experiments import preset_evaluations

BIG = ("hps_sdxl", "hps_sd35", "hps_flux", "hps_sdxl_24gb", "hps_flux_24gb", "hps_sd35_full", "hps_flux_full")


@pytest.mark.parametrize("name", BIG)
def test_big_presets_evaluate_every_held_out_caption_on_fixed_latents(preset, name):
    config = preset(name)
    prompts = evaluate.evaluation_prompts(config)
    # The 50 HPSv2 evaluation captions, each once (was: 1 per pass x max_vis_images 2 drawn with replacement).
    assert sorted(prompts) == sorted(load_prompts("eval_hps_v2_all")) and len(set(prompts)) == 50
    assert not set(prompts) & set(load_prompts(config.prompt_fn))  # held out: never trained on
    assert config.same_evaluation and config.eval_prompts == "all"
    updates = config.num_epochs * plan_batches(config.train, 1).updates_per_epoch
    assert 2 <= jobs.evaluations_in_training(config, updates) <= 10  # before, every 50 updates, after


@pytest.mark.parametrize(
    ("vis_freq", "updates", "first", "expected"),
    [(1, 4, 0, 5), (0, 4, 0, 2), (3, 10, 0, 5), (50, 400, 0, 9), (50, 300, 0, 7), (3, 10, 4, 4), (5, 10, 0, 3)],
)
def test_evaluation_count_follows_the_training_loop(preset, vis_freq, updates, first, expected):
    """before + every vis_freq-th update + the last if not one of them (hand-counted: 3 over 10 updates evaluates
    at 0, 3, 6, 9 and 10; resumed after update 4: at 4, 6, 9, 10)."""
    config = preset("tiny")
    config.vis_freq = vis_freq
    assert jobs.evaluations_in_training(config, updates, first) == expected


def test_the_readme_table_is_regenerated_from_the_presets():
    start, end = preset_evaluations.MARKERS
    readme = preset_evaluations.README.read_text()
    assert readme.split(start)[1].split(end)[0].strip() == preset_evaluations.table()


def test_the_readme_quotes_the_start_up_line_of_hps_flux(preset):
    config = preset("hps_flux")
    line = jobs.describe_evaluation(config, config.num_epochs * plan_batches(config.train, 1).updates_per_epoch)
    readme = " ".join(preset_evaluations.README.read_text().split())
    assert f"e.g. `{line}`" in readme
