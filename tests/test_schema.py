"""Every config key has a rule (alignprop/schema.py); every bad value is one short line, exit 2, nothing written.

BAD_VALUES is the table of bad config values. With tests/test_main.py's BAD_INPUTS and BAD_FILES it is also the
list in README.md's "When things go wrong" (`python tests/test_schema.py --write-readme` regenerates it;
`test_readme_lists_every_bad_input` fails when they differ).
"""

import logging
import math
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # alignprop and tests/test_main.py, also when run as a script

from test_main import BAD_FILES, BAD_INPUTS, assert_one_clear_line, fork_main  # noqa: E402

from alignprop import jobs, schema  # noqa: E402
from alignprop.errors import UserError  # noqa: E402
from alignprop.presets import CONFIG_FILE, load_preset  # noqa: E402

MAX_LINE = 300  # characters of the whole `error: ...` line
HUGE = "a" * 1_000_000  # a 1 MB value: quoted as an excerpt, never whole
SOUP = {"soup_inference": True}

# name: ({key: value, ...}, fragment of the error line). Checked through jobs.prepare, what the CLI runs.
BAD_VALUES = {
    "learning_rate inf": ({"train.learning_rate": math.inf}, "train.learning_rate must be a finite number in (0, 1]"),
    "learning_rate nan": ({"train.learning_rate": math.nan}, "train.learning_rate must be a finite number"),
    "learning_rate negative": ({"train.learning_rate": -1e-3}, "got -0.001"),
    "max_grad_norm negative": ({"train.max_grad_norm": -1.0}, "train.max_grad_norm must be a finite number > 0"),
    "max_grad_norm zero": ({"train.max_grad_norm": 0.0}, "train.max_grad_norm must be a finite number > 0"),
    "num_epochs zero": ({"num_epochs": 0}, "num_epochs must be an integer in [1, "),
    "num_epochs negative": ({"num_epochs": -3}, "num_epochs must be an integer in [1, "),
    "eta nan": ({"eta": math.nan}, "eta must be a finite number in [0, 1]"),
    "eta negative": ({"eta": -0.5}, "eta must be a finite number in [0, 1]"),
    "eta above one": ({"eta": 1.5}, "eta must be a finite number in [0, 1]"),
    "guidance nan": ({"sd_guidance_scale": math.nan}, "sd_guidance_scale must be a finite number in [0, 100]"),
    "guidance negative": ({"sd_guidance_scale": -2.0}, "sd_guidance_scale must be a finite number in [0, 100]"),
    "adam_beta1 1.5": ({"train.adam_beta1": 1.5}, "train.adam_beta1 must be a finite number in [0, 1)"),
    "adam_epsilon zero": ({"train.adam_epsilon": 0.0}, "train.adam_epsilon must be a finite number > 0"),
    "negative weight decay": ({"train.adam_weight_decay": -0.1}, "train.adam_weight_decay"),
    "seed negative": ({"seed": -1}, "seed must be an integer in [0, 4294967295]"),
    "seed a bool": ({"seed": True}, "seed must be an integer"),
    "steps zero": ({"steps": 0}, "steps must be an integer in [1, 1000]"),
    "minmax of three": ({"truncated_backprop_minmax": (0, 1, 2)}, "truncated_backprop_minmax must be a pair"),
    "minmax reversed": ({"truncated_backprop_minmax": (5, 2)}, "with a <= b"),
    "gaussian mean nan": ({"truncation_gaussian_mean": math.nan}, "truncation_gaussian_mean must be a finite"),
    "lora.rank zero": ({"lora.rank": 0}, "lora.rank must be an integer in [1, 1024]"),
    "lora.rank negative": ({"lora.rank": -4}, "lora.rank must be an integer in [1, 1024]"),
    "no LoRA targets": ({"lora.target_modules": ()}, "lora.target_modules must be a non-empty tuple"),
    "derived field set": ({"train.gradient_accumulation_steps": 0}, "-1 or an integer in [1, "),
    "soup coefficient 3": ({**SOUP, "mixing_coef_1": 3.0}, "mixing_coef_1 must be a finite number in [-1, 2]"),
    "soup sweep beyond [-1, 2]": ({**SOUP, "soup_sweep": (0.0, -5.0)}, "soup_sweep must be a tuple of finite"),
    "resume_from_2 without soup": ({"resume_from_2": "stablediffusion"}, "add --config.soup_inference=True"),
    "soup_mode without soup": ({"soup_mode": "delta"}, "soup_mode is a soup option"),
    "soup_sweep without soup": ({"soup_sweep": (0, 1)}, "add --config.soup_inference=True"),
    "mixing_coef_1 without soup": ({"mixing_coef_1": 0.5}, "add --config.soup_inference=True"),
    "unknown soup_mode": ({**SOUP, "soup_mode": "average"}, "soup_mode must be one of: params, delta"),
    "1 MB prompt_fn": ({"prompt_fn": HUGE}, "prompt_fn must be at most 200 characters, not 1000000"),
    "1 MB run_name": ({"run_name": HUGE}, "run_name must be at most 200 characters"),
    "newline in run_name": ({"run_name": "a\nb"}, "run_name must not contain control"),
    "NUL in a path": ({"pretrained.model": "a\x00b"}, "pretrained.model must not contain control"),
    "empty logdir": ({"logdir": ""}, "logdir must be a non-empty text"),
    "combination weight not a number": (
        {"reward_fn": "combined", "rewards.combination": "toyworld_shape:abc"},
        "weight 'abc' of 'toyworld_shape' is not a number",
    ),
    "combination weight inf": (
        {"reward_fn": "combined", "rewards.combination": "toyworld_shape:inf"},
        "rewards.combination: the weights must be finite",
    ),
    "unknown preprocess mode": ({"rewards.preprocess": "bilinear"}, "rewards.preprocess must be one of"),
    "unknown colour target": ({"rewards.toyworld.colour_target": "pink"}, "rewards.toyworld.colour_target"),
    "area target 1.5": ({"rewards.toyworld.area_target": 1.5}, "rewards.toyworld.area_target"),
    "position target of one": ({"rewards.toyworld.position_target": (0.5,)}, "rewards.toyworld.position_target"),
    "unknown hps version": ({"rewards.hps.version": "v3"}, "rewards.hps.version must be one of: v2.0, v2.1"),
    "a value of the wrong type": ({"steps": "many"}, "steps must be an integer"),
    "None for a number": ({"eta": None}, "eta must be a finite number"),
}

# A few of them through the real command line (each costs a process start, ~5 s): the flag values as typed.
CLI_CASES = {
    "learning_rate inf": ["--config.train.learning_rate=inf"],
    "seed negative": ["--config.seed=-1"],
    "minmax of three": ["--config.truncated_backprop_minmax=(0,1,2)"],
    "resume_from_2 without soup": ["--config.resume_from_2=stablediffusion"],
    "1 MB prompt_fn": [f"--config.prompt_fn={'a' * 100_000}"],  # argv holds at most 128 KiB per argument
}


def override(config, key: str, value, type_safe: bool = False) -> None:
    """config.<key> = value for a dotted key; type_safe=False: any type, as a Python caller could."""
    *parents, name = key.split(".")
    for parent in parents:
        config = config[parent]
    if type_safe:
        config[name] = value
    else:
        with config.ignore_type():
            config[name] = value


def configured(values: dict, logdir: Path, name: str = "tiny"):
    config = load_preset(name)
    config.logdir = str(logdir)
    for key, value in values.items():
        override(config, key, value)
    return config


def assert_message_contract(message: str) -> None:
    """What main.py prints for a UserError: one `error: ` line, short."""
    line = f"error: {message}"
    assert message and "\n" not in message and "\r" not in message, repr(message[:500])
    assert len(line) < MAX_LINE, f"{len(line)} characters: {line[:400]}"


def assert_cli_contract(result, logdir: Path, fragment: str = "") -> None:
    """Exit 2; stderr exactly one line, `error: ...`, under 300 characters; no traceback; nothing in logdir."""
    assert_one_clear_line(result, fragment, logdir)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[:2000]
    assert len(lines[0]) < MAX_LINE, lines[0][:400]


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_value_is_one_short_line_before_anything_is_written(case, tmp_path):
    values, fragment = BAD_VALUES[case]
    logdir = tmp_path / "logs"
    with pytest.raises(UserError) as raised:
        jobs.prepare(configured(values, logdir), 1)
    message = str(raised.value)
    assert fragment in message, message[:400]
    assert_message_contract(message)
    assert not logdir.exists()


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_bad_value_on_the_command_line(case, tmp_path):
    logdir = tmp_path / "logs"
    result = fork_main("--config", "config/align_prop.py:tiny", f"--config.logdir={logdir}", *CLI_CASES[case])
    fragment = BAD_VALUES[case][1].replace("1000000", "100000")
    assert_cli_contract(result, logdir, fragment)


def preset_names() -> tuple[str, ...]:
    from alignprop.shipped import load_config_module

    return tuple(load_config_module(CONFIG_FILE).PRESETS)


@pytest.mark.parametrize("name", preset_names())
def test_every_key_of_every_preset_has_a_rule_and_the_preset_passes_it(name):
    config = load_preset(name)
    keys = [key for key, _ in schema.leaves(config)]
    assert [key for key in keys if key not in schema.RULES] == [], "add a rule to alignprop/schema.py RULES"
    assert [key for key in schema.RULES if key not in keys] == [], "a rule for a key that no longer exists"
    schema.check(config)


def test_a_key_without_a_rule_is_refused():
    config = load_preset("tiny")
    config.unlock()
    config.new_knob = 1
    with pytest.raises(UserError, match="config key 'new_knob' has no rule in alignprop/schema.py"):
        schema.check(config)


def test_soup_only_options_are_at_their_inert_values_outside_the_soup_presets():
    for name in preset_names():
        config = load_preset(name)
        if not config.soup_inference:
            for key, inert in schema.SOUP_ONLY.items():
                assert not schema._differs(config[key], inert), (name, key)


def test_boundary_values_are_accepted():
    config = load_preset("tiny")
    for key, value in {
        "eta": 1.0,
        "sd_guidance_scale": 0.0,
        "train.adam_beta1": 0.0,
        "train.learning_rate": 1,  # an int for a float
        "seed": 2**32 - 1,
        "steps": 1000,
        "truncated_backprop_minmax": [0, 0],
        "train.gradient_accumulation_steps": 3,
        "lora.rank": 1024,
        "prompt_fn": "p" * schema.MAX_TEXT,
    }.items():
        override(config, key, value)
    schema.check(config)


def test_soup_coefficients_outside_zero_one_warn_in_one_line(caplog):
    config = configured({**SOUP, "soup_sweep": ("-0.5, 0.5", 1.5)}, Path("unused"))
    with caplog.at_level(logging.WARNING, logger="alignprop.schema"):
        schema.check(config)
    assert [r.getMessage() for r in caplog.records] == [
        "soup coefficient(s) (-0.5, 1.5) outside [0, 1]: the soup extrapolates beyond the two LoRAs"
    ]


def test_excerpt_is_short():
    assert schema.excerpt("a" * 10) == "'aaaaaaaaaa'"
    assert len(schema.excerpt(HUGE)) == schema.EXCERPT_CHARS and schema.excerpt(HUGE).endswith("…")
    assert len(schema.excerpt(tuple(range(10**5)))) == schema.EXCERPT_CHARS


# --- README.md: its bad-input list is generated from the tables above --------------------------------------

README = ROOT / "README.md"
BEGIN, END = "<!-- bad-inputs: generated by `python tests/test_schema.py --write-readme` -->", "<!-- /bad-inputs -->"


def readme_bad_inputs() -> str:
    """The README's list: every case name of the three tables, one line of Markdown per table."""
    tables = [
        ("`tests/test_main.py` (command line)", BAD_INPUTS),
        ("`tests/test_main.py` (files)", BAD_FILES),
        ("`tests/test_schema.py` (config values; `CLI_CASES` also on the command line)", BAD_VALUES),
    ]
    lines = [
        textwrap.fill(f"{where}: {', '.join(sorted(table))}.", 120, initial_indent="  - ", subsequent_indent="    ")
        for where, table in tables
    ]
    return "\n".join([BEGIN, *lines, END])


def readme_block(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def test_readme_lists_every_bad_input():
    text = README.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, "README.md lacks the generated bad-input list"
    assert readme_block(text) == readme_bad_inputs(), "run: python tests/test_schema.py --write-readme"


if __name__ == "__main__" and sys.argv[1:] == ["--write-readme"]:
    text = README.read_text(encoding="utf-8")
    README.write_text(text.replace(readme_block(text), readme_bad_inputs()), encoding="utf-8")
    print(f"updated {README}")
