"""Safe paths: whatever the run name, the run directory is one new directory directly under logdir."""

import pickle

import pytest

from alignprop import checkpoint
from alignprop.errors import UserError
from alignprop.rundir import MAX_NAME_LENGTH, create_run_dir, slugify

NASTY_NAMES = [
    "..",
    "../../etc",
    "a/../../b",
    "/etc/passwd",
    "C:\\Windows\\system32",
    "a\x00b",
    "x" * 1000,
    "猫の写真 🐱",
    "café crème",
    ".hidden",
    "-rf",
    "~",
    "",
]


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_slugify_gives_one_plain_file_name(name):
    slug = slugify(name)
    assert slug and len(slug) <= MAX_NAME_LENGTH
    assert set(slug) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    assert ".." not in slug and not slug.startswith((".", "-"))


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_run_dir_stays_directly_under_logdir(name, tmp_path):
    logdir = tmp_path / "logs"
    run_dir = create_run_dir(str(logdir), name)
    assert run_dir.parent == logdir and run_dir.is_dir()
    assert run_dir.resolve().parent == logdir.resolve()


def test_a_taken_name_gets_a_suffix_instead_of_sharing(tmp_path):
    first, second = create_run_dir(str(tmp_path), "run"), create_run_dir(str(tmp_path), "run")
    assert (first.name, second.name) == ("run", "run_1")


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_a_training_state_that_needs_unpickling_code_is_refused(tmp_path):
    path = tmp_path / "checkpoint_1"
    path.mkdir()
    (path / checkpoint.STATE_FILE).write_bytes(pickle.dumps({"epoch": Payload()}, protocol=2))
    with pytest.raises(UserError, match="cannot read the training state .*needs arbitrary code to unpickle"):
        checkpoint.Checkpoint(path, {"epoch": 1}).training_state()
