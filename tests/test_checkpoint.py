"""Checkpoint directories: atomic save, completion marker, rotation, resolution of resume_from."""

import json
import random

import numpy as np
import pytest
import torch

from alignprop import checkpoint
from alignprop.errors import UserError
from alignprop.lora_files import LORA_FILE_NAME
from alignprop.randomness import RandomStreams, global_state, preserved_global_state, set_global_state


def fake_contents(directory):
    (directory / LORA_FILE_NAME).write_bytes(b"lora")
    (directory / checkpoint.STATE_FILE).write_bytes(b"state")


def save(root, epoch, write=fake_contents):
    return checkpoint.save(root, epoch, {"update": 2 * epoch, "num_processes": 1}, write)


def visible_and_hidden(root):
    names = sorted(p.name for p in root.iterdir())
    return [n for n in names if not n.startswith(".")], [n for n in names if n.startswith(".")]


def test_save_writes_the_files_and_a_marker_listing_them(tmp_path):
    path = save(tmp_path / "checkpoints", 3)
    assert path.name == "checkpoint_3"
    marker = json.loads((path / checkpoint.MARKER_FILE).read_text())
    assert marker["epoch"] == 3 and marker["update"] == 6 and marker["num_processes"] == 1
    assert sorted(marker["files"]) == sorted([LORA_FILE_NAME, checkpoint.STATE_FILE])
    assert checkpoint.resolve(str(path)).path == path
    assert visible_and_hidden(tmp_path / "checkpoints") == (["checkpoint_3"], [])


def test_rotation_keeps_exactly_the_newest_n(tmp_path):
    root = tmp_path / "checkpoints"
    for epoch in range(1, 8):
        save(root, epoch)
        checkpoint.rotate(root, keep=3)
    assert visible_and_hidden(root) == (["checkpoint_5", "checkpoint_6", "checkpoint_7"], [])
    # Order is by epoch number, not by name: checkpoint_10 is newer than checkpoint_9.
    for epoch in (9, 10):
        save(root, epoch)
    checkpoint.rotate(root, keep=2)
    assert visible_and_hidden(root)[0] == ["checkpoint_10", "checkpoint_9"]


def test_a_save_that_fails_half_way_leaves_nothing(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 1)

    def dies_half_way(directory):
        (directory / LORA_FILE_NAME).write_bytes(b"lora")
        raise KeyboardInterrupt  # e.g. the job is cancelled while writing

    with pytest.raises(KeyboardInterrupt):
        save(root, 2, dies_half_way)
    assert visible_and_hidden(root) == (["checkpoint_1"], [])
    assert checkpoint.resolve(str(tmp_path)).epoch == 1


def test_resume_ignores_what_a_killed_save_leaves(tmp_path):
    """A process killed outright (no cleanup) leaves a hidden staging directory; a copy interrupted by hand
    can leave checkpoint_N without its marker or with a file missing. None of them is ever picked up."""
    root = tmp_path / "checkpoints"
    save(root, 1)
    save(root, 2)
    staging = root / f"{checkpoint.TEMP_PREFIX}checkpoint_3-abc"  # killed before the rename
    staging.mkdir()
    fake_contents(staging)
    unmarked = root / "checkpoint_4"  # files but no marker
    unmarked.mkdir()
    fake_contents(unmarked)
    truncated = save(root, 5)  # marked, but a listed file went missing
    (truncated / checkpoint.STATE_FILE).unlink()

    assert [c.epoch for c in checkpoint.complete_checkpoints(root)] == [1, 2]
    assert checkpoint.resolve(str(tmp_path)).path == root / "checkpoint_2"  # the run directory
    assert checkpoint.resolve(str(root)).path == root / "checkpoint_2"  # its checkpoints/ directory
    for incomplete in (staging, unmarked, truncated):
        with pytest.raises(UserError, match="incomplete checkpoint"):
            checkpoint.resolve(str(incomplete))
    # Rotation counts complete checkpoints only.
    checkpoint.rotate(root, keep=1)
    assert [c.epoch for c in checkpoint.complete_checkpoints(root)] == [2]


@pytest.mark.parametrize("layout", ["missing", "empty", "only_incomplete"])
def test_resolve_refuses_paths_without_a_complete_checkpoint(tmp_path, layout):
    if layout == "empty":
        (tmp_path / "run").mkdir()
    if layout == "only_incomplete":
        (tmp_path / "run" / "checkpoints" / "checkpoint_1").mkdir(parents=True)
    expected = "does not exist" if layout == "missing" else "no complete checkpoint"
    with pytest.raises(UserError, match=expected):
        checkpoint.resolve(str(tmp_path / "run"))


def test_resolve_weights_accepts_lora_directories_and_files(tmp_path):
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    (lora_dir / LORA_FILE_NAME).write_bytes(b"x")
    assert checkpoint.resolve_weights(str(lora_dir)) == lora_dir / LORA_FILE_NAME
    assert checkpoint.resolve_weights(str(lora_dir / LORA_FILE_NAME)) == lora_dir / LORA_FILE_NAME
    complete = save(tmp_path / "run" / "checkpoints", 1)
    assert checkpoint.resolve_weights(str(tmp_path / "run")) == complete / LORA_FILE_NAME


def test_random_states_round_trip_through_a_weights_only_file(tmp_path):
    streams = RandomStreams.seeded(seed=7, process_index=0)
    streams.prompts.random(), torch.rand(3, generator=streams.latents)
    torch.save({"streams": streams.state_dict(), "global": global_state()}, tmp_path / "state.pt")
    draw = lambda s: (s.prompts.random(), torch.rand(4, generator=s.latents), torch.rand(2, generator=s.plans))  # noqa: E731
    draw_global = lambda: (random.random(), np.random.rand(), torch.rand(2))  # noqa: E731
    expected, expected_global = draw(streams), draw_global()

    state = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = RandomStreams.seeded(seed=0, process_index=3)
    fresh.load_state_dict(state["streams"])
    set_global_state(state["global"])
    got, got_global = draw(fresh), draw_global()
    assert got[0] == expected[0] and torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])
    assert got_global[0] == expected_global[0] and got_global[1] == expected_global[1]
    assert torch.equal(got_global[2], expected_global[2])


def test_preserved_global_state_hides_the_draws_of_a_block():
    before = global_state()
    with preserved_global_state():
        torch.rand(5), np.random.rand(), random.random()
    after = global_state()
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]
    assert torch.equal(before["numpy"]["keys"], after["numpy"]["keys"])


def test_an_interrupt_checkpoint_sorts_between_epochs_and_needs_the_same_epoch_length(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 1)  # update 2
    mid = checkpoint.save(root, 1, {"update": 3, "num_processes": 1}, fake_contents, mid_epoch=True)
    assert mid.name == "checkpoint_1_update_3"
    assert [c.path.name for c in checkpoint.complete_checkpoints(root)] == ["checkpoint_1", "checkpoint_1_update_3"]
    assert checkpoint.resolve(str(root)).path == mid
    checkpoint.check_resumable(checkpoint.resolve(str(mid)), num_epochs=3, updates_per_epoch=2)
    with pytest.raises(UserError, match="saved mid-epoch .* another number of updates per epoch"):
        checkpoint.check_resumable(checkpoint.resolve(str(mid)), num_epochs=3, updates_per_epoch=1)
    save(root, 2)
    assert checkpoint.resolve(str(root)).path.name == "checkpoint_2"
