"""Failure behaviour of training: non-finite updates are skipped, Ctrl-C saves and resumes exactly, a run
SIGKILLed at any point (a checkpoint save included) resumes to bit-identical LoRA weights, and a full disk stops
the run with one line, its last complete checkpoint intact."""

import contextlib
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoint_runs import read_metrics, run, straight_run, tiny_config
from safetensors.torch import load_file, save_file

from alignprop import checkpoint, jobs
from alignprop.errors import UserError
from alignprop.lora_files import LORA_FILE_NAME
from alignprop.pause import PAUSE_ENV
from alignprop.rundir import MetricsLog
from alignprop.train import Trainer

ROOT = Path(__file__).resolve().parent.parent


# --- non-finite guard -------------------------------------------------------------------------------


def snapshot(trainer):
    params = [p.detach().clone() for p in trainer.params]
    state = trainer.optimizer.state_dict()["state"]
    optimizer = {i: {k: v.clone() for k, v in s.items()} for i, s in state.items()}
    return params, optimizer


def same(a, b):
    params_a, opt_a = a
    params_b, opt_b = b
    return (
        all(torch.equal(x, y) for x, y in zip(params_a, params_b))
        and opt_a.keys() == opt_b.keys()
        and all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    )


@pytest.fixture
def nan_on_updates(monkeypatch):
    """nan_on_updates(updates) -> list of (record, unchanged): the loss is NaN in those (1-based) updates."""

    def install(nan_updates):
        seen = []
        sample_and_score, train_update = Trainer.sample_and_score, Trainer.train_update

        def poisoned_sample_and_score(self, batch):
            out = sample_and_score(self, batch)
            if self.update + 1 in nan_updates:
                out.loss = out.loss * float("nan")
            return out

        def watched_update(self):
            before = snapshot(self)
            record = train_update(self)
            seen.append((record, same(before, snapshot(self))))
            return record

        monkeypatch.setattr(Trainer, "sample_and_score", poisoned_sample_and_score)
        monkeypatch.setattr(Trainer, "train_update", watched_update)
        return seen

    return install


def test_a_nan_update_is_skipped_logged_and_counted(preset, tmp_path, nan_on_updates):
    seen = nan_on_updates({2, 3})
    run_dir, _ = run(tiny_config(preset, tmp_path, run_name="nan", num_epochs=2, save_freq=1))
    assert [record["skipped_nonfinite"] for record, _ in seen] == [False, True, True, False]
    assert [unchanged for _, unchanged in seen] == [False, True, True, False]  # skipped: weights + Adam as before
    logged = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["skipped_nonfinite"] for r in logged] == [False, True, True, False]
    assert [r["nonfinite_count"] for r in logged] == [0, 1, 2, 2]
    for saved in checkpoint.complete_checkpoints(run_dir / "checkpoints"):
        weights = load_file(saved.lora_path)
        assert all(torch.isfinite(w).all() for w in weights.values())
        state = saved.training_state()
        assert all(torch.isfinite(v).all() for s in state["optimizer"]["state"].values() for v in s.values())


def test_too_many_nonfinite_updates_in_a_row_stop_the_run_keeping_the_last_checkpoint(preset, tmp_path, nan_on_updates):
    nan_on_updates({3, 4, 5, 6})
    config = tiny_config(preset, tmp_path, run_name="stop", num_epochs=3, save_freq=1, max_nonfinite_in_a_row=2)
    with pytest.raises(UserError, match="stopped at update 4: 2 updates in a row had a non-finite loss"):
        run(config)
    saved = checkpoint.complete_checkpoints(tmp_path / "stop" / "checkpoints")
    assert [(c.epoch, c.info["update"]) for c in saved] == [(1, 2)]  # the last good one, untouched
    assert checkpoint.resolve(str(tmp_path / "stop")).path == saved[0].path


def test_a_checkpoint_with_a_nonfinite_value_is_refused(preset, tmp_path, monkeypatch):
    def poison_then_save(self):
        with torch.no_grad():
            self.params[0][0] = float("inf")
        return save(self)

    save = Trainer.save_checkpoint
    monkeypatch.setattr(Trainer, "save_checkpoint", poison_then_save)
    with pytest.raises(UserError, match="refusing to save a checkpoint with non-finite values"):
        run(tiny_config(preset, tmp_path, run_name="inf", num_epochs=1, save_freq=1))
    assert checkpoint.complete_checkpoints(tmp_path / "inf" / "checkpoints") == []


# --- subprocess runs of main.py ---------------------------------------------------------------------

# Two epochs of two updates, a checkpoint after each epoch: the straight run of checkpoint_runs.py.
TRAIN_ARGS = ["--config", "config/align_prop.py:tiny", "--config.num_epochs=2", "--config.save_freq=1"]
TRAIN_ARGS += ["--config.vis_freq=2", "--config.max_vis_images=1"]


def start(logdir, run_name, *extra, pause="", file_size_limit=None):
    """main.py in a subprocess; `pause`: "<point>:<seconds>" of the test hook in alignprop/pause.py."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", PAUSE_ENV: pause}
    args = [*TRAIN_ARGS, f"--config.logdir={logdir}", f"--config.run_name={run_name}", *extra]
    command = [sys.executable, str(ROOT / "main.py"), *args]
    limit = None if file_size_limit is None else lambda: limit_file_size(file_size_limit)
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit
    )


def wait_for(process, condition, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"exited early: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def updates_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return max((r["update"] for r in lines if "loss" in r), default=0)


def evaluations_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(1 for line in lines if line.endswith("}") and json.loads(line).get("eval"))


def saving(run_dir):
    """A checkpoint is being written: its staging directory holds the LoRA and training state already."""
    root = run_dir / "checkpoints"
    staging = [p for p in root.glob(f"{checkpoint.TEMP_PREFIX}*")] if root.exists() else []
    return any((p / checkpoint.STATE_FILE).exists() for p in staging)


def kill(process):
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL


def assert_same_lora(expected_dir, got_dir):
    expected, got = load_file(expected_dir / LORA_FILE_NAME), load_file(got_dir / LORA_FILE_NAME)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def resume_to_the_end(preset, logdir, source, **overrides):
    config = tiny_config(preset, logdir, run_name="final", num_epochs=2, save_freq=1, vis_freq=2, max_vis_images=1)
    config.update(overrides)
    config.resume_from = str(source)
    return run(config)[0]


def test_ctrl_c_saves_the_last_update_and_resume_continues_exactly(preset, tmp_path_factory, tmp_path):
    # One epoch of 4 updates draws exactly what the straight run's 2 epochs of 2 do (no per-epoch randomness),
    # so a Ctrl-C lands mid-epoch and must still end on the straight run's weights.
    one_epoch = ["--config.num_epochs=1", "--config.train.total_samples_per_epoch=32"]
    process = start(tmp_path, "interrupted", *one_epoch)
    run_dir = tmp_path / "interrupted"
    wait_for(process, lambda: updates_logged(run_dir) >= 1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    stopped = updates_logged(run_dir)  # the update in flight when Ctrl-C came was finished
    assert 1 <= stopped < 4
    assert [line for line in stderr.splitlines() if line.startswith("interrupted:")] == [
        f"interrupted: stopped after update {stopped}; saved checkpoint in {run_dir / 'checkpoints'}; "
        f"resume_from={run_dir}"
    ]
    saved = checkpoint.resolve(str(run_dir))
    assert saved.path.name == f"checkpoint_0_update_{stopped}" and saved.info["update"] == stopped
    final = resume_to_the_end(preset, tmp_path, run_dir, num_epochs=1, train={"total_samples_per_epoch": 32})
    assert [r["update"] for r in read_metrics(final) if "loss" in r] == list(range(stopped + 1, 5))
    assert_same_lora(straight_run(preset, tmp_path_factory) / "lora", final / "lora")


def leftovers(run_dir):
    """Hidden temporary directories under run_dir/checkpoints (a staging or a half-deleted checkpoint)."""
    return sorted(p.name for p in (run_dir / "checkpoints").glob(f"{checkpoint.TEMP_PREFIX}*"))


def test_sigkill_anywhere_then_resume_gives_the_same_lora(preset, tmp_path_factory, tmp_path):
    # 1. Killed mid-epoch 2, after checkpoint_1 was written.
    first = start(tmp_path, "a")
    wait_for(first, lambda: updates_logged(tmp_path / "a") >= 3)
    kill(first)
    assert checkpoint.resolve(str(tmp_path / "a")).path.name == "checkpoint_1"
    resume = f"--config.resume_from={tmp_path / 'a'}"
    # 2. Resumed, then killed during its first evaluation (the test hook holds it there).
    second = start(tmp_path, "b", resume, pause="evaluate:60")
    wait_for(second, lambda: evaluations_logged(tmp_path / "b") == 1)
    kill(second)
    with pytest.raises(UserError, match="holds no complete checkpoint"):
        checkpoint.resolve(str(tmp_path / "b"))
    # 3. Resumed again, killed while writing checkpoint_2 (files written, not yet marked and renamed).
    third = start(tmp_path, "c", resume, pause="save:60")
    wait_for(third, lambda: saving(tmp_path / "c"))
    kill(third)
    assert leftovers(tmp_path / "c") != []  # the half-written save is there, and invisible:
    with pytest.raises(UserError, match="holds no complete checkpoint"):
        checkpoint.resolve(str(tmp_path / "c"))
    # 4. Resumed again, killed during start-up (before its first update).
    fourth = start(tmp_path, "d", resume)
    wait_for(fourth, lambda: (tmp_path / "d" / "config.json").exists())
    kill(fourth)
    # Resumed once more from the newest complete checkpoint, to the end.
    final = resume_to_the_end(preset, tmp_path, tmp_path / "a")
    straight = straight_run(preset, tmp_path_factory)
    for name in ("lora", "checkpoints/checkpoint_2"):
        assert_same_lora(straight / name, final / name)


def test_sigkill_between_a_save_and_the_rotation_keeps_both_and_resumes_from_the_newest(
    preset, tmp_path_factory, tmp_path
):
    # 5. num_checkpoint_limit=1: checkpoint_2 is renamed into place, then checkpoint_1 is to be deleted; killed
    # in between (the test hook holds it there).
    process = start(tmp_path, "r", "--config.num_checkpoint_limit=1", pause="rotate:60")
    run_dir = tmp_path / "r"
    wait_for(process, lambda: len(checkpoint.complete_checkpoints(run_dir / "checkpoints")) == 2)
    kill(process)
    assert not (run_dir / "lora").exists()  # killed before the end of the run
    assert [c.path.name for c in checkpoint.complete_checkpoints(run_dir / "checkpoints")] == [
        "checkpoint_1",
        "checkpoint_2",
    ]
    assert leftovers(run_dir) == []
    newest = checkpoint.resolve(str(run_dir))
    assert newest.path.name == "checkpoint_2"
    assert_same_lora(straight_run(preset, tmp_path_factory) / "checkpoints" / "checkpoint_2", newest.path)
    # Its 2 epochs are done; a resume asking for a third is accepted and starts from checkpoint_2.
    config = tiny_config(preset, tmp_path, run_name="more", num_epochs=3, save_freq=1, resume_from=str(run_dir))
    assert jobs.prepare(config, num_processes=1).kind == "train"
    assert config.resume_from == str(newest.path)


# --- a full disk ------------------------------------------------------------------------------------
# A file-size limit (RLIMIT_FSIZE, `ulimit -f`) makes every write past it fail with EFBIG, through the real
# writers (safetensors' Rust one, torch, PIL, Python's files): the honest stand-in for a disk that fills up
# without root or a small file system. Python ignores SIGXFSZ, so the write fails instead of killing the process.


def limit_file_size(size):
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@contextlib.contextmanager
def file_size_limit(size):
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit_file_size(size)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)


def too_big(size):
    return {"w": torch.zeros(size // 2)}  # float32: twice the bytes


# The two writers of a checkpoint; each used to fail with its own exception type (SafetensorError, RuntimeError).
CHECKPOINT_WRITERS = {
    "lora": lambda directory: save_file(too_big(4096), directory / LORA_FILE_NAME),  # what diffusers calls
    "training state": lambda directory: checkpoint.write_training_state(directory, too_big(4096)),
}


@pytest.mark.parametrize("writer", sorted(CHECKPOINT_WRITERS))
def test_a_save_on_a_full_disk_raises_a_save_error_naming_the_checkpoint_and_leaves_nothing(writer, tmp_path):
    root = tmp_path / "checkpoints"
    with file_size_limit(4096), pytest.raises(checkpoint.SaveError) as failed:
        checkpoint.save(root, 1, {"update": 2}, CHECKPOINT_WRITERS[writer])
    assert (failed.value.errno, failed.value.filename) == (errno.EFBIG, str(root / "checkpoint_1"))
    assert list(root.iterdir()) == []


def test_a_full_disk_during_a_save_stops_the_run_keeping_the_previous_checkpoint(preset, tmp_path, monkeypatch):
    # ENOSPC itself needs a file system that is really full: raised here at the second save, after the LoRA
    # was written into the staging directory (the file-size limit tests above go through the real writers).
    saves = []

    def disk_fills_up(directory, state):
        saves.append(directory)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_training_state(directory, state)

    write_training_state = checkpoint.write_training_state
    monkeypatch.setattr(checkpoint, "write_training_state", disk_fills_up)
    one_update_per_epoch = {"total_samples_per_epoch": 8}
    config = tiny_config(preset, tmp_path, run_name="full", num_epochs=2, save_freq=1, train=one_update_per_epoch)
    with pytest.raises(UserError) as failed:
        run(config)
    run_dir = tmp_path / "full"
    assert str(failed.value) == (
        f"cannot write {run_dir / 'checkpoints' / 'checkpoint_2'}: No space left on device [ENOSPC]; "
        f"free space in {tmp_path}, then resume_from={run_dir}"
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint_1"]  # no staging left
    config = tiny_config(preset, tmp_path, run_name="again", num_epochs=2, save_freq=1, train=one_update_per_epoch)
    config.resume_from = str(run_dir)
    jobs.prepare(config, num_processes=1)  # resumable: complete, readable, matching
    assert config.resume_from == str(run_dir / "checkpoints" / "checkpoint_1")


def test_a_full_disk_during_a_save_is_one_clear_line_from_main(preset, tmp_path_factory, tmp_path):
    # Resumed from the straight run's checkpoint_1; the limit lets the evaluation files through but not the
    # LoRA of checkpoint_2, the first file of the save.
    straight = straight_run(preset, tmp_path_factory)
    source = straight / "checkpoints" / "checkpoint_1"
    limit = (source / LORA_FILE_NAME).stat().st_size // 2
    written_before = [straight / "config.json", *(straight / "eval" / "update_000002").rglob("*.*")]
    assert max(p.stat().st_size for p in written_before) < limit, "this model's files do not fit the test"
    process = start(tmp_path, "b", f"--config.resume_from={source}", file_size_limit=limit)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        f"error: cannot write {tmp_path / 'b' / 'checkpoints' / 'checkpoint_2'}: File too large [EFBIG]; "
        f"free space in {tmp_path}, then resume_from={source}"
    ]
    assert list((tmp_path / "b" / "checkpoints").iterdir()) == []


def test_a_full_disk_elsewhere_in_the_run_is_one_clear_line(preset, tmp_path, monkeypatch):
    # metrics.jsonl cannot take the first update's record (a write error on an open file names no file).
    def disk_full_at_the_first_update(self, record):
        if "loss" in record:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(self, record)

    write = MetricsLog.write
    monkeypatch.setattr(MetricsLog, "write", disk_full_at_the_first_update)
    with pytest.raises(UserError) as failed:
        run(tiny_config(preset, tmp_path, run_name="full", num_epochs=1))
    assert str(failed.value) == (
        f"cannot write {tmp_path / 'full'}: No space left on device [ENOSPC]; free space in {tmp_path}, "
        "then start it again"
    )
