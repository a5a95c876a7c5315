"""The original's truncation flags on the presets (issue 12, point 2).

Every preset expresses truncation with the original's flags (truncation_strategy="auto"), so the original's
overrides work; the base, like the original's `general()`, does full backprop. A truncation_strategy named next
to an original flag it contradicts is one clear error. Every combination on the command line is parsed in
process with absl and ml_collections (what main.py does); two go through main.py.
"""

import itertools

import pytest
from absl import flags
from ml_collections import config_flags
from test_main import ROOT, assert_one_clear_line, run_main

from alignprop import cli
from alignprop.errors import UserError
from alignprop.truncation import truncation_from_config

CONFIG = str(ROOT / "config" / "align_prop.py")
STRATEGIES = (None, "auto", "fixed", "per_step_uniform", "uniform", "gaussian", "full")
FLAG_VALUES = (None, True, False)
RANDOM = ("per_step_uniform", "uniform", "gaussian")


def parse(preset: str, args: list[str]):
    """(config, explicit keys) exactly as main.py gets them from this command line."""
    argv = ["main.py", "--config", f"{CONFIG}:{preset}", *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)  # overrides read from argv
    values(argv)
    return values.config, cli.explicit_keys(argv)


def effective(preset: str, args: list[str]) -> str:
    """The strategy the run uses, or the error's text."""
    config, explicit = parse(preset, args)
    try:
        cli.check_truncation_flags(config, explicit)
    except UserError as error:
        return f"error: {error}"
    return truncation_from_config(config).strategy


def command_line(strategy, truncated, rand) -> list[str]:
    args = [] if strategy is None else [f"--config.truncation_strategy={strategy}"]
    args += [] if truncated is None else [f"--config.truncated_backprop={truncated}"]
    return args + ([] if rand is None else [f"--config.truncated_backprop_rand={rand}"])


def contradicts(strategy, truncated, rand) -> bool:
    if strategy in (None, "auto"):
        return False
    return (
        (truncated is False and strategy != "full")
        or (truncated is True and strategy == "full")
        or (rand is True and strategy not in RANDOM)
        or (rand is False and strategy in RANDOM)
    )


def expected(preset_flags: tuple[bool, bool], strategy, truncated, rand) -> str:
    if contradicts(strategy, truncated, rand):
        return "error"
    if strategy not in (None, "auto"):
        return strategy
    truncated = preset_flags[0] if truncated is None else truncated
    rand = preset_flags[1] if rand is None else rand
    return "full" if not truncated else ("per_step_uniform" if rand else "fixed")


@pytest.mark.parametrize("preset_name, preset_flags", [("aesthetic", (True, True)), ("hps_k1", (True, False))])
def test_every_combination_on_the_command_line(preset_name, preset_flags):
    for strategy, truncated, rand in itertools.product(STRATEGIES, FLAG_VALUES, FLAG_VALUES):
        args = command_line(strategy, truncated, rand)
        got = effective(preset_name, args)
        want = expected(preset_flags, strategy, truncated, rand)
        if want == "error":
            assert got.startswith("error: --config.truncation_strategy=") and "contradicts" in got, (args, got)
            assert "\n" not in got and len(got) < 300
        else:
            assert got == want, (args, got)


@pytest.mark.parametrize(
    "preset_name, strategy, cut, minmax",
    [
        ("aesthetic", "per_step_uniform", 40, (0, 50)),
        ("aesthetic_k1", "fixed", 49, (0, 50)),
        ("hps", "per_step_uniform", 40, (0, 50)),
        ("hps_k1", "fixed", 49, (0, 50)),
        ("tiny", "per_step_uniform", 19, (0, 20)),
        ("evaluate", "full", 100, (35, 45)),  # the base: the original's general() values, full backprop
    ],
)
def test_presets_use_the_original_flags_and_values(preset, preset_name, strategy, cut, minmax):
    config = preset(preset_name)
    assert config.truncation_strategy == "auto"
    assert truncation_from_config(config).strategy == strategy
    assert config.trunc_backprop_timestep == cut and tuple(config.truncated_backprop_minmax) == minmax


def test_original_overrides_now_take_effect_on_the_paper_presets():
    assert effective("aesthetic", ["--config.truncated_backprop_rand=False"]) == "fixed"
    assert effective("hps", ["--config.truncated_backprop=False"]) == "full"
    assert effective("aesthetic", ["--noconfig.truncated_backprop"]) == "full"  # absl's boolean negation
    config, _ = parse("aesthetic", ["--config.truncated_backprop_rand=False"])
    assert truncation_from_config(config).cut == 40  # the original's aesthetic cut, unused until random is off


def test_a_strategy_fixed_by_a_config_file_is_checked_against_given_flags(preset):
    config = preset("tiny")
    config.truncation_strategy = "uniform"  # as a user's own config file might set it
    config.truncated_backprop_rand = False  # ... and then --config.truncated_backprop_rand=False
    with pytest.raises(UserError, match="the preset's truncation_strategy=uniform contradicts"):
        cli.check_truncation_flags(config, {"truncated_backprop_rand"})


def test_explicit_keys_reads_every_override_form():
    argv = [
        "main.py",
        "--config",
        "c.py:tiny",
        "--config.a=1",
        "--config.train.b",
        "2",
        "--noconfig.c",
        "--",
        "--config.d=1",
    ]
    assert cli.explicit_keys(argv) == {"a", "train.b", "c"}


def test_a_contradiction_through_main_py_is_one_line_and_writes_nothing(tmp_path):
    logdir = tmp_path / "logs"
    result = run_main(
        "--config",
        "config/align_prop.py:tiny",
        "--config.truncation_strategy=fixed",
        "--config.truncated_backprop_rand=True",
        f"--config.logdir={logdir}",
    )
    assert_one_clear_line(result, "contradicts --config.truncated_backprop_rand=True", logdir)


def test_agreeing_strategy_and_flag_through_main_py(tmp_path):
    logdir = tmp_path / "logs"
    result = run_main(
        "--config",
        "config/align_prop.py:tiny",
        "--config.truncation_strategy=full",
        "--config.truncated_backprop=False",
        "--config.dry_run=True",
        f"--config.logdir={logdir}",
    )
    assert result.returncode == 0, result.stderr
    assert not logdir.exists()
