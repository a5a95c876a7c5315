"""Exact resume on the tiny preset: N epochs straight == N/2, then resume, then N/2 (bit for bit on CPU)."""

import json

import pytest
import torch
from checkpoint_runs import CADENCE, read_metrics, run, straight_run, tiny_config
from safetensors.torch import load_file

from alignprop import checkpoint, jobs
from alignprop.errors import UserError
from alignprop.lora_files import LORA_FILE_NAME

VOLATILE = {"seconds"}  # wall-clock time is the only field allowed to differ


def training_records(run_dir):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run_dir) if "loss" in r]


def tree(path):
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def halves(preset, tmp_path_factory):
    """One epoch, then a resume from that run directory up to two epochs."""
    logdir = tmp_path_factory.mktemp("halves")
    first, _ = run(tiny_config(preset, logdir, run_name="first", num_epochs=1, **CADENCE))
    first_tree = tree(first)
    second, _ = run(tiny_config(preset, logdir, run_name="second", num_epochs=2, resume_from=str(first), **CADENCE))
    return first, second, first_tree


def test_resume_reproduces_the_straight_run_bit_for_bit(preset, tmp_path_factory, halves):
    straight = straight_run(preset, tmp_path_factory)
    first, second, _ = halves
    for name in ("checkpoints/checkpoint_2/" + LORA_FILE_NAME, "lora/" + LORA_FILE_NAME):
        expected, got = load_file(straight / name), load_file(second / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[key], got[key]) for key in expected), name
    # Every logged training number (rewards, loss, grad norm, truncation plans) is the same.
    assert training_records(first) + training_records(second) == training_records(straight)
    assert [r["update"] for r in training_records(second)] == [3, 4]
    # So is the optimizer state the next resume would start from.
    expected = torch.load(straight / "checkpoints/checkpoint_2" / checkpoint.STATE_FILE, weights_only=True)
    got = torch.load(second / "checkpoints/checkpoint_2" / checkpoint.STATE_FILE, weights_only=True)
    assert (got["epoch"], got["update"]) == (expected["epoch"], expected["update"]) == (2, 4)
    for index, values in expected["optimizer"]["state"].items():
        assert all(torch.equal(values[k], got["optimizer"]["state"][index][k]) for k in values)


def test_resume_writes_a_new_run_and_leaves_the_old_one_alone(halves):
    first, second, first_tree = halves
    assert tree(first) == first_tree
    assert second != first
    records = read_metrics(second)
    assert records[0]["resumed_from"] == str(first / "checkpoints" / "checkpoint_1")
    config = json.loads((second / "config.json").read_text())
    assert config["resume_from"] == str(first / "checkpoints" / "checkpoint_1")  # the exact checkpoint
    assert [c.epoch for c in checkpoint.complete_checkpoints(second / "checkpoints")] == [2]


def test_checkpoint_holds_the_diffusers_lora_and_a_weights_only_training_state(preset, tmp_path_factory):
    saved = checkpoint.resolve(str(straight_run(preset, tmp_path_factory)))
    assert saved.epoch == 2
    state = saved.training_state()  # torch.load(weights_only=True): plain tensors and containers only
    assert {"epoch", "update", "optimizer", "scaler", "random", "trainable"} <= state.keys()
    assert len(state["random"]) == 1 and {"streams", "global"} <= state["random"][0].keys()
    assert {"prompts", "latents", "plans"} == state["random"][0]["streams"].keys()
    assert {"python", "numpy", "torch"} <= state["random"][0]["global"].keys()
    assert all(key.startswith("unet.") and ".lora." in key for key in load_file(saved.lora_path))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_epochs": 2}, "already has 2 epochs"),
        ({"num_epochs": 4, "lora": {"rank": 8}}, "r=4, the config asks for 8"),
        ({"num_epochs": 4, "save_freq": -1}, "save_freq must be"),
    ],
)
def test_resume_refusals_write_nothing(preset, tmp_path_factory, tmp_path, overrides, message):
    source = straight_run(preset, tmp_path_factory)
    config = tiny_config(preset, tmp_path / "logs", resume_from=str(source))
    lora = overrides.pop("lora", {})
    config.update(overrides)
    config.lora.update(lora)
    with pytest.raises(UserError, match=message):
        jobs.prepare(config, num_processes=1)
    assert not (tmp_path / "logs").exists()
