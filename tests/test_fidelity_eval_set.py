"""eval_prompts: the original's evaluation set (issue 12, point 4).

The original drew train.batch_size_per_gpu_available x max_vis_images prompts at random, with replacement, from
the eval prompt file once at start, and saved every image; "all" (the default outside the paper presets)
evaluates every line x eval_images_per_prompt and keeps the first max_vis_images images during training.
"""

import json
from collections import Counter

import pytest
from small_runs import make_trainer, small_config

from alignprop import schema
from alignprop.errors import UserError
from alignprop.evaluate import evaluation_prompts, saved_image_count
from alignprop.prompts import load_prompts


@pytest.mark.parametrize(
    "name, count", [("aesthetic", 16), ("aesthetic_k1", 16), ("hps", 8), ("hps_k1", 8), ("evaluate", 40)]
)
def test_paper_presets_draw_the_original_number_of_prompts_with_replacement(preset, name, count):
    config = preset(name)
    assert config.eval_prompts == "original"
    assert count == config.train.batch_size_per_gpu_available * config.max_vis_images
    drawn = evaluation_prompts(config)
    assert len(drawn) == count and set(drawn) <= set(load_prompts(config.eval_prompt_fn))
    assert drawn == evaluation_prompts(config)  # drawn once from the seed: the same set every evaluation
    if name.startswith("aesthetic"):
        assert max(Counter(drawn).values()) > 1  # 16 draws from 6 animals: with replacement
    assert saved_image_count(config) is None  # every image is saved, as the original did


def test_the_draw_follows_the_seed(preset):
    config = preset("evaluate")
    first = evaluation_prompts(config)
    config.seed = 7
    assert evaluation_prompts(config) != first


def test_all_evaluates_every_line_times_eval_images_per_prompt(preset):
    config = preset("tiny")
    assert config.eval_prompts == "all"
    lines = load_prompts(config.eval_prompt_fn)
    assert evaluation_prompts(config) == lines
    config.eval_images_per_prompt = 2
    assert evaluation_prompts(config) == lines * 2
    assert saved_image_count(config) == config.max_vis_images


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"eval_images_per_prompt": 2}, "eval_images_per_prompt applies to eval_prompts='all'"),
        ({"max_vis_images": 0}, "max_vis_images must be at least 1"),
    ],
)
def test_original_set_refuses_settings_it_would_ignore(preset, overrides, fragment):
    config = preset("aesthetic")
    config.update(overrides)
    with pytest.raises(UserError, match=fragment):
        schema.check(config)


def test_training_evaluation_with_the_original_set_saves_every_image(preset, tmp_path):
    config = small_config(preset, tmp_path, eval_prompts="original", max_vis_images=2, num_epochs=1, vis_freq=1)
    trainer = make_trainer(config)
    trainer.fit()
    summary = json.loads((trainer.run_dir / "eval" / "update_000001" / "summary.json").read_text())
    assert summary["num_images"] == 4  # batch_size_per_gpu_available 2 x max_vis_images 2
    assert all(image["file"] for image in summary["images"])  # all saved, not only the first max_vis_images
