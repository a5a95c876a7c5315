"""The evaluate mode and the evaluation written during training: numbers, files, names."""

import json
import re

import pytest
import torch
from checkpoint_runs import evaluated_run, read_metrics, run, straight_run, tiny_config
from PIL import Image

from alignprop import jobs
from alignprop.errors import UserError
from alignprop.evaluate import EvalResult, generate_and_score, image_file_name, write_evaluation
from alignprop.families import family_of
from alignprop.models import load_pipeline
from alignprop.prompts import load_prompts
from alignprop.rewards import build_reward
from alignprop.sampling import sampling_options_from_config

NASTY_PROMPTS = [
    "a/b\\c",
    "../../etc/passwd",
    "...",
    "",
    "a photo of a cat, " * 40,
    "猫の写真 🐱",
    "CON",
    'a:b*?"<>|',
    "café crème",
    "a/b\\c",  # a duplicate: its file must not overwrite the first one
]
SAFE_NAME = re.compile(r"\d{4}_[A-Za-z0-9._-]+\.png")


def test_evaluate_mode_scores_the_checkpoint_like_training_did(preset, tmp_path_factory):
    run_dir, result = evaluated_run(preset, tmp_path_factory)
    straight = straight_run(preset, tmp_path_factory)
    final_eval = [r for r in read_metrics(straight) if r.get("eval")][-1]
    assert final_eval["update"] == 4
    # Same sampler, same seeded latents, same weights: the same numbers as the evaluation after training.
    assert result.summary()["reward_mean"] == final_eval["reward_mean"]
    assert result.summary()["checker_shape_mean"] == final_eval["checker_shape_mean"]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mode"] == "evaluate" and summary["num_images"] == 30 and summary["seed"] == 42
    assert summary["lora"].endswith("checkpoints/checkpoint_2/pytorch_lora_weights.safetensors")
    for key in ("reward_mean", "reward_std", "checker_shape_mean", "checker_shape_std"):
        assert summary[key] == pytest.approx(result.summary()[key])
    names = [image["file"] for image in summary["images"]]
    assert names[:2] == [
        "images/0000_a_yellow_circle_on_a_red_background.png",
        "images/0001_a_yellow_circle_on_a_green_background.png",
    ]
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == sorted(n.split("/")[1] for n in names)
    assert [image["reward"] for image in summary["images"]] == pytest.approx(result.rewards.tolist())
    assert Image.open(run_dir / "grid.png").size[0] > 0


def test_evaluation_does_not_depend_on_how_prompts_are_shared_out(tmp_path, preset):
    """Two processes each take every second prompt: merged, they give the one-process images exactly."""
    config = preset("tiny")
    pipeline = load_pipeline(config.pretrained.model)
    reward = build_reward(config, torch.device("cpu"), torch.float32)
    prompts = load_prompts(config.prompt_fn)[:4]
    model, options = family_of(pipeline), sampling_options_from_config(config)
    whole = generate_and_score(model, reward, prompts, options, batch_size=4, seed=3)
    parts = []
    for rank in range(2):
        indices = list(range(len(prompts)))[rank::2]
        share = generate_and_score(model, reward, prompts, options, 2, seed=3, indices=indices)
        parts.append((indices, share))
    merged = EvalResult.merge(parts)
    assert merged.prompts == prompts
    # Batches of 2 vs 4 round differently; over 20 steps of the trained model that is up to ~3e-6 here.
    assert torch.allclose(merged.images, whole.images, atol=1e-5)
    assert torch.allclose(merged.rewards, whole.rewards, atol=1e-4)


def test_file_names_are_safe_for_any_prompt(tmp_path):
    count = len(NASTY_PROMPTS)
    result = EvalResult(
        prompts=NASTY_PROMPTS,
        images=torch.rand(count, 3, 16, 16) * 2 - 1,
        rewards=torch.arange(count, dtype=torch.float32),
        metrics={"part": torch.ones(count)},
    )
    summary = write_evaluation(result, tmp_path / "out", {"mode": "test"})
    files = sorted((tmp_path / "out" / "images").iterdir())
    assert len(files) == count  # one per image, the duplicate prompt included
    for path in files:
        assert SAFE_NAME.fullmatch(path.name), path.name
        assert len(path.name) <= 4 + 1 + 48 + 4
        assert path.parent == tmp_path / "out" / "images"  # nothing escaped the directory
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_file()) == ["grid.png", "summary.json"]
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [image["prompt"] for image in written["images"]] == NASTY_PROMPTS  # prompts kept verbatim in the JSON
    assert summary["part_mean"] == 1.0 and summary["reward_std"] > 0
    assert image_file_name(7, "../x") == "0007_x.png"


def test_evaluate_mode_with_a_prompt_file_of_awkward_prompts(preset, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    awkward = ["a/b\\c", "../../etc/passwd", "a photo of a cat, " * 40, "猫の写真 🐱"]
    prompt_file.write_text("\n".join(awkward) + "\n", encoding="utf-8")
    config = tiny_config(
        preset,
        tmp_path / "logs",
        run_name="awkward",
        only_eval=True,
        resume_from="stablediffusion",  # the base model
        eval_prompt_fn=str(prompt_file),
        eval_images_per_prompt=2,
        reward_fn="compressibility",  # any prompt: the toy world's rewards only read toy-world captions
    )
    run_dir, result = run(config)
    images = sorted((run_dir / "images").iterdir())
    assert len(images) == len(result.prompts) == 2 * len(awkward)
    assert result.prompts == [p.strip() for p in awkward] * 2
    assert all(SAFE_NAME.fullmatch(p.name) for p in images)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["lora"] is None and summary["num_images"] == 8


def test_training_evaluates_every_vis_freq_updates_keeping_max_vis_images(preset, tmp_path_factory):
    run_dir = straight_run(preset, tmp_path_factory)  # vis_freq=2, max_vis_images=1, 4 updates
    evaluations = sorted(p.name for p in (run_dir / "eval").iterdir())
    assert evaluations == ["update_000000", "update_000002", "update_000004"]  # before training, then every 2
    for name in evaluations:
        assert len(list((run_dir / "eval" / name / "images").iterdir())) == 1
        summary = json.loads((run_dir / "eval" / name / "summary.json").read_text())
        assert summary["num_images"] == 30 and summary["mode"] == "train"  # statistics over every image
    evals = [r for r in read_metrics(run_dir) if r.get("eval")]
    assert [r["update"] for r in evals] == [0, 2, 4]
    assert (run_dir / "before_after.png").stat().st_size > 0


def test_only_eval_without_a_checkpoint_is_refused(preset, tmp_path):
    config = tiny_config(preset, tmp_path / "logs", only_eval=True)
    with pytest.raises(UserError, match="only_eval needs --config.resume_from"):
        jobs.prepare(config, num_processes=1)
    config.resume_from = str(tmp_path / "missing")
    with pytest.raises(UserError, match="does not exist"):
        jobs.prepare(config, num_processes=1)
    assert not (tmp_path / "logs").exists()
