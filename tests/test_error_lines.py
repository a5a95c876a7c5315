"""Every error line stays under 300 characters whatever the length of the user's values, and loads that fail say
only their one line (what they printed while loading is held back)."""

import os
import sys

import pytest
from test_schema import assert_message_contract, configured

from alignprop import jobs
from alignprop.errors import UserError
from alignprop.held_output import held_back_stderr
from alignprop.session import build_session

# Text keys whose values reach messages (paths, hub ids, names), each with the settings that make the run read it.
QUOTED_KEYS = {
    "pretrained.model": {},
    "pretrained.vae": {},
    "pretrained.config": {},
    "prompt_fn": {},
    "eval_prompt_fn": {},
    "resume_from": {},
    "logdir": {},
    "rewards.toyworld.classifier": {},
    "rewards.aesthetic.clip_model": {"eval_reward_fns": "aesthetic"},
    "rewards.aesthetic.processor": {"eval_reward_fns": "aesthetic"},
    "rewards.aesthetic.head_path": {"eval_reward_fns": "aesthetic"},
    "rewards.combination": {"reward_fn": "combined"},
    "eval_reward_fns": {},
    "hub_model_id": {"push_to_hub": True},
}
LENGTHS = (1, 81, 200, 201, 100_000)  # around the excerpt (80) and the text limit (200), and far beyond
SHAPES = ("/no/such/", "someone/", "")  # a path that does not exist, a hub id that is not cached, a bare name


def value(shape: str, length: int) -> str:
    return (shape + "v" * length)[:length] if length > len(shape) else "v" * length


@pytest.mark.parametrize("key", sorted(QUOTED_KEYS))
def test_an_error_line_is_short_for_a_value_of_any_length(key, tmp_path):
    refused = 0
    for shape in SHAPES:
        for length in LENGTHS:
            settings = {**QUOTED_KEYS[key], key: value(shape, length)}
            if key != "logdir":
                settings["logdir"] = str(tmp_path / "logs")
            config = configured(settings, tmp_path / "logs")
            try:
                jobs.prepare(config, 1)
                build_session(config)  # what run_job loads before the run directory exists
            except UserError as error:
                assert_message_contract(str(error))
                refused += 1
    assert refused >= len(LENGTHS)  # at least the values beyond 200 characters


def test_held_back_output_appears_after_success_and_is_dropped_on_failure(capfd):
    with held_back_stderr():
        print("a bar", file=sys.stderr)
        os.write(2, b"written to the descriptor\n")
        assert capfd.readouterr().err == ""  # nothing yet
    assert capfd.readouterr().err == "a bar\nwritten to the descriptor\n"
    with pytest.raises(UserError), held_back_stderr():
        print("a warning before the refusal", file=sys.stderr)
        os.write(2, b"a C-level line\n")
        raise UserError("the one line")
    assert capfd.readouterr().err == ""
    print("after", file=sys.stderr)
    assert capfd.readouterr().err == "after\n"  # stderr is back where it was
