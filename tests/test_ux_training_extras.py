"""Training additions: a learning-rate schedule with warmup (saved in checkpoints, resumed exactly), training
samples (`visualize_train`) and `debug` (anomaly detection)."""

import json

import pytest
import torch
from checkpoint_runs import read_metrics, run
from safetensors.torch import load_file
from small_runs import make_trainer, small_config

from alignprop import checkpoint
from alignprop.lora_files import LORA_FILE_NAME

LR = 1e-3  # the tiny preset's
# diffusers' "linear" with 2 warmup updates over 4: update k uses the factor at k - 1: 0, 1/2, then decay 1, 1/2.
LINEAR_WARMUP_LRS = [0.0, LR / 2, LR, LR / 2]


def training_records(run_dir):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def scheduled(preset, tmp_path_factory):
    """2 epochs (4 updates) with linear warmup, training samples every update and a checkpoint every epoch;
    then 1 epoch resumed from its first checkpoint up to 2 epochs."""
    tmp = tmp_path_factory.mktemp("schedule")
    settings = {
        "train.lr_scheduler": "linear",
        "train.lr_warmup_steps": 2,
        "save_freq": 1,
        "visualize_train": True,
        "vis_freq": 1,
        "max_vis_images": 1,
    }
    straight, _ = run(small_config(preset, tmp, run_name="straight", **settings))
    first_checkpoint = straight / checkpoint.CHECKPOINTS_DIR / "checkpoint_1"
    resumed, _ = run(small_config(preset, tmp, run_name="resumed", resume_from=str(first_checkpoint), **settings))
    return straight, resumed


def test_warmup_schedule_sets_each_updates_learning_rate(scheduled):
    straight, _ = scheduled
    assert [r["lr"] for r in training_records(straight)] == pytest.approx(LINEAR_WARMUP_LRS, abs=1e-12)


def test_constant_schedule_is_the_default(preset, tmp_path):
    config = small_config(preset, tmp_path)
    assert (config.train.lr_scheduler, config.train.lr_warmup_steps) == ("constant", 0)
    trainer = make_trainer(config)
    assert [trainer.train_update()["lr"] for _ in range(3)] == [LR] * 3


def test_resume_continues_the_schedule_exactly(scheduled):
    straight, resumed = scheduled
    assert [r["lr"] for r in training_records(resumed)] == pytest.approx(LINEAR_WARMUP_LRS[2:], abs=1e-12)
    assert training_records(straight)[2:] == training_records(resumed)
    expected, got = load_file(straight / "lora" / LORA_FILE_NAME), load_file(resumed / "lora" / LORA_FILE_NAME)
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    state = torch.load(straight / "checkpoints/checkpoint_1" / checkpoint.STATE_FILE, weights_only=True)
    assert state["lr_scheduler"]["last_epoch"] == 2  # two updates done: the schedule's position is saved


def test_visualize_train_saves_the_first_training_image_of_every_update(scheduled):
    straight, _ = scheduled
    directories = sorted((straight / "train_samples").iterdir())
    assert [d.name for d in directories] == [f"update_{n:06d}" for n in (1, 2, 3, 4)]
    for directory, record in zip(directories, training_records(straight)):
        summary = json.loads((directory / "summary.json").read_text())
        assert summary["mode"] == "train_samples" and summary["num_images"] == 1
        assert (directory / summary["images"][0]["file"]).is_file() and (directory / "grid.png").is_file()
        assert summary["update"] == record["update"]


def test_no_training_samples_by_default(preset, tmp_path):
    trainer = make_trainer(small_config(preset, tmp_path))
    trainer.train_update()
    assert not (trainer.run_dir / "train_samples").exists()


@pytest.mark.parametrize("debug", [False, True])
def test_debug_turns_on_anomaly_detection_in_training_updates(preset, tmp_path, debug):
    trainer = make_trainer(small_config(preset, tmp_path, debug=debug))
    seen = []
    sample_and_score = trainer.sample_and_score

    def recording(batch):
        seen.append(torch.is_anomaly_enabled())
        return sample_and_score(batch)

    trainer.sample_and_score = recording
    trainer.train_update()
    assert seen == [debug] and not torch.is_anomaly_enabled()  # on only inside the update


@pytest.mark.parametrize(
    ("save_freq", "num_epochs", "first", "expected"),
    [(20, 2, 0, [2]), (2, 5, 0, [2, 4, 5]), (4, 200, 0, list(range(4, 201, 4))), (3, 7, 4, [6, 7]), (0, 5, 0, [])],
)
def test_the_save_schedule_lists_every_saved_epoch_and_the_last(preset, save_freq, num_epochs, first, expected):
    config = preset("tiny")
    config.save_freq, config.num_epochs = save_freq, num_epochs
    assert checkpoint.saved_epochs(config, first) == expected


def test_the_start_up_line_says_which_checkpoints_a_run_saves(preset, tmp_path, capsys):
    """num_epochs=2 with the tiny preset's save_freq 20 saves one checkpoint, after epoch 2 (the issue's case); a
    run with save_freq 2 over 5 epochs saves exactly the epochs the line names."""
    from alignprop import jobs

    config = small_config(preset, tmp_path, save_freq=20)
    job = jobs.prepare(config, num_processes=1)
    line = next(x for x in jobs.describe(job, config, tmp_path / "RUN").splitlines() if x.startswith("checkpoints:"))
    assert "after epoch 2 (1 checkpoint(s))" in line and "every" not in line
    # The README's example: hps saves as the original did (save_schedule="original").
    assert (
        checkpoint.describe_schedule(preset("hps"))
        == "after epoch 1, 5, ..., 197 (50 checkpoint(s); the newest 10 kept)"
    )
    config = small_config(preset, tmp_path, save_freq=2, num_epochs=5, num_checkpoint_limit=2, vis_freq=3)
    run_dir, _ = run(config)
    out = capsys.readouterr().out.splitlines()
    said = next(x for x in out if x.startswith("checkpoints:"))
    assert "after epoch 2, 4, 5 (3 checkpoint(s); the newest 2 kept)" in said
    evaluations = [r for r in read_metrics(run_dir) if r.get("eval")]
    assert [r["update"] for r in evaluations] == [0, 3, 6, 9, 10]
    assert next(x for x in out if x.startswith("evaluation:")).endswith(": 5 evaluations, 10 images")
    saved = sorted(path.name for path in (run_dir / checkpoint.CHECKPOINTS_DIR).iterdir())
    assert saved == ["checkpoint_4", "checkpoint_5"]  # 2 was saved, then rotated out by the limit
    metrics = [r for r in read_metrics(run_dir) if "loss" in r]
    assert len(metrics) == 5 * 2  # every epoch ran: the last checkpoint is the final epoch's
