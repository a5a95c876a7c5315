"""The command line of `python main.py` and `python -m alignprop`: --config FILE:PRESET plus --config.KEY=VALUE.

Every configuration error is one line `error: ...` on stderr with exit status 2; `--help` lists the presets and
exits 0; no `--config` prints the usage and exits 2 (it never starts a run nobody asked for).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import traceback
from pathlib import Path

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from alignprop import schema
from alignprop.errors import Interrupted, UserError, excerpt, shorten
from alignprop.shipped import CONFIG_FILE, load_config_module

FLAGS = flags.FLAGS
# No default: a default preset would be parsed (with the overrides) as soon as the flag is defined, before any
# error handling, and a forgotten --config would silently start a run.
config_flags.DEFINE_config_file("config", None, "PRESET or path/to/config.py:PRESET, e.g. config/align_prop.py:tiny.")

HELP_ARGS = ("-h", "-help", "--help", "-?", "--helpshort", "--helpfull")
CONFIG_ARG = re.compile(r"^--?config(=|$)")
DESCRIPTION = "AlignProp: fine-tune a text-to-image diffusion model by backpropagating a differentiable reward."
COMMANDS = {  # `alignprop NAME ARGS`: tools that read finished runs (alignprop/NAME.py, also python -m alignprop.NAME)
    "compare": "RUN_OR_EVAL [...] [--out DIR]   paired comparison of evaluations: compare.{md,csv,png}",
    "curves": "RUN                             RUN/curves.png: reward, held-out metrics, grad norm, lr",
}


# --- help and usage (answered without loading torch) ---------------------------------------------------------


def program_name(argv0: str) -> str:
    """How this was started: `python main.py` (its path from here), `python -m alignprop` or `alignprop`."""
    name = Path(argv0).name
    if name == "__main__.py":
        return "python -m alignprop"
    return f"python {shown_path(Path(argv0))}" if name.endswith(".py") else name


def launcher(argv0: str) -> str:
    """The multi-GPU command for how this was started: main.py by its path from here, else the installed module."""
    name = Path(argv0).name
    if name.endswith(".py") and name != "__main__.py":
        return f"accelerate launch {shown_path(Path(argv0))}"
    return "accelerate launch -m alignprop"


def preset_spec(preset: str) -> str:
    """How to name `preset` from here: by the config file's path in a clone (config/align_prop.py:tiny), by its
    name alone elsewhere (an installed alignprop; `--config tiny`), so every command shown runs where it is read."""
    shown = shown_path(CONFIG_FILE)
    return preset if Path(shown).is_absolute() else f"{shown}:{preset}"


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it is below it (what one would type), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def preset_lines(path: Path = CONFIG_FILE) -> list[str]:
    """One line per preset of the config file: its name and the first line of its function's docstring."""
    module = load_config_module(path)
    names = list(getattr(module, "PRESETS", ()))
    width = max((len(name) for name in names), default=0)
    lines = []
    for name in names:
        doc = (getattr(module, name).__doc__ or "").strip().splitlines()
        lines.append(f"  {name:<{width}}  {doc[0].strip() if doc else ''}".rstrip())
    return lines


def usage(argv0: str) -> str:
    prog, config = program_name(argv0), shown_path(CONFIG_FILE)
    return "\n".join(
        [
            f"usage: {prog} --config {preset_spec('PRESET')} [--config.KEY=VALUE ...]",
            f"       {launcher(argv0)} --config {preset_spec('PRESET')} [...]   (one or more GPUs)",
            "",
            f"presets ({config}):",
            *preset_lines(),
        ]
    )


HELP_KEYS = "--help-keys"


def keys_text(argv: list[str]) -> str:
    """`--help-keys [PREFIX]`: every config key (starting with PREFIX) with its default, the --config preset's or else
    the base config's, and what it takes, from its rule in alignprop/schema.py."""
    from alignprop.schema import RULES, leaves

    arguments = given_arguments(argv)
    following = arguments[arguments.index(HELP_KEYS) + 1 :]
    prefix = following[0] if following and not following[0].startswith("-") else ""
    spec = config_argument(argv)
    path, _, preset = (spec or str(CONFIG_FILE)).partition(":")
    try:
        module = load_config_module(Path(path))
        config = module.get_config(preset) if preset else module.general()
    except Exception as error:  # a missing file or preset: one line, as for a run
        reason = shorten(str(error), 120)
        raise UserError(f"--help-keys cannot read --config {excerpt(spec or path)}: {reason}") from None
    lines = [
        f"{key} = {value!r}: {RULES[key].expected() if key in RULES else ''}"
        for key, value in leaves(config)
        if key.startswith(prefix)
    ]
    if not lines:
        raise UserError(f"no config key starts with {excerpt(prefix)}; --help-keys alone lists them all")
    return "\n".join(lines)


def help_text(argv0: str) -> str:
    prog, config, tiny = program_name(argv0), shown_path(CONFIG_FILE), preset_spec("tiny")
    return "\n".join(
        [
            DESCRIPTION,
            "",
            usage(argv0),
            "",
            "examples:",
            f"  {prog} --config {tiny}                      # the CPU demo: no downloads, ~1 minute",
            f"  {prog} --config {tiny} --config.num_epochs=2 --config.train.learning_rate=5e-4",
            f"  {prog} --config {tiny} --config.only_eval=True --config.resume_from=logs/RUN",
            f"  {prog} --config {preset_spec('hps_flux')} --config.dry_run=True   # what to download; the run's size",
            f"  {launcher(argv0)} --config {preset_spec('aesthetic')}",
            "",
            "commands:",
            *[f"  {prog} {name} {what}" for name, what in COMMANDS.items()],
            "",
            "--config is a preset's name alone (the presets above) or a config file's path, relative to the working",
            "directory, followed by :PRESET. Any value of the preset can be overridden with --config.KEY=VALUE, nested",
            "keys with dots (--config.train.learning_rate=5e-4);",
            f"the keys, their defaults and what they mean are in {config}; {HELP_KEYS} [PREFIX] lists them",
            "with their defaults (a preset's with --config) and the values each takes. Runs are written to",
            "--config.logdir (default: logs/) in a new run directory; see README.md.",
        ]
    )


def given_arguments(argv: list[str]) -> list[str]:
    """The arguments before a `--` (absl stops reading flags there)."""
    arguments = argv[1:]
    return arguments[: arguments.index("--")] if "--" in arguments else arguments


# --- one line for every configuration error ------------------------------------------------------------------


FLAG_ERROR_CHARS = 240  # absl's flag errors quote the user's value whole: keep the line short


def fail(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def last_error_line(text: str) -> str:
    """The final 'SomethingError: message' line of an absl/ml_collections error text, else its first line."""
    matches = re.findall(r"^\s*\w*(?:Error|Exception): (.+)$", text, flags=re.MULTILINE)
    return matches[-1] if matches else text.strip().splitlines()[0]


def config_argument(argv: list[str]) -> str | None:
    """The value of --config (`--config X` or `--config=X`; the last one, as absl reads it), None when not given."""
    arguments, value = given_arguments(argv), None
    for index, argument in enumerate(arguments):
        match = CONFIG_ARG.match(argument)
        if match:
            value = argument[match.end() :] if match.group(1) else (arguments[index + 1 : index + 2] or [""])[0]
    return value


BARE_NAME = re.compile(r"^\w+$")


def preset_path(value: str) -> str:
    """A --config value as absl loads it: a bare name that is no file here (`tiny`) is the shipped config's preset."""
    return f"{CONFIG_FILE}:{value}" if BARE_NAME.match(value) and not Path(value).exists() else value


def with_preset_paths(argv: list[str]) -> list[str]:
    """`argv` with each `--config NAME` / `--config=NAME` given as the shipped config file's path and :NAME."""
    resolved, arguments = list(argv), given_arguments(argv)
    for index, argument in enumerate(arguments, start=1):
        match = CONFIG_ARG.match(argument)
        if match and match.group(1):
            resolved[index] = argument[: match.end()] + preset_path(argument[match.end() :])
        elif match and index < len(arguments):
            resolved[index + 1] = preset_path(arguments[index])
    return resolved


# Keys that existed in an earlier version, with what replaces them (said instead of a close match).
REMOVED_KEYS = {
    "fold_lora": "it gave no measurable speed (benchmarks/README.md); compile_denoiser is the faster switch",
}


# Other tools' names for a key (accelerate's `log_with`), with alignprop's.
KEY_ALIASES = {"log_with": "tracker"}


def key_elsewhere(name: str, config: ConfigDict) -> str | None:
    """The key that a top-level `name` means: the one whose last components, joined by '_', spell it
    (refl_last_steps: gradient_paths.refl.last_steps; rank: lora.rank); None when none or several do."""
    from alignprop.schema import leaves

    found = []
    for key, _ in leaves(config):
        parts = key.split(".")
        if any("_".join(parts[-count:]) == name for count in range(1, len(parts) + 1)):
            found.append(key)
    return found[0] if len(found) == 1 else None


def unknown_key(argv: list[str], config: ConfigDict, config_file: str) -> str | None:
    """'unknown config key ...' for the first --config.A.B override naming a key the config does not have."""
    for argument in given_arguments(argv):
        match = re.match(r"^--?(?:no)?config\.([^=]+)", argument)
        if not match:
            continue
        if match.group(1) in REMOVED_KEYS and match.group(1) not in config:
            return f"config key {match.group(1)!r} was removed: {REMOVED_KEYS[match.group(1)]} (see {config_file})"
        parts = match.group(1).split(".")
        node = config
        for depth, part in enumerate(parts):
            if isinstance(node, ConfigDict) and part in node:
                node = node[part]
                continue
            known = ".".join(parts[:depth])
            if not isinstance(node, ConfigDict):
                return f"config key {known!r} holds a value, not keys: --config.{match.group(1)} does not exist"
            close = difflib.get_close_matches(part, [str(key) for key in node.keys()], n=1)
            where = f" (see {config_file})"
            name = match.group(1)
            moved = KEY_ALIASES.get(name) or ("." not in name and key_elsewhere(name, config))
            if moved:
                return f"unknown config key {name!r}; did you mean {moved!r}?{where}"
            if close:
                suggestion = ".".join([*parts[:depth], close[0]])
                return f"unknown config key {'.'.join(parts[: depth + 1])!r}; did you mean {suggestion!r}?{where}"
            return f"unknown config key {'.'.join(parts[: depth + 1])!r}{where}"
    return None


def explain_unknown_key(argv: list[str], error: Exception) -> str:
    """The unknown-key line, worked out from the config file itself (ml_collections' own text holds escapes)."""
    spec = config_argument(argv) or ""
    path, _, preset = spec.partition(":")
    try:
        module = load_config_module(Path(path))
        config = module.get_config(preset) if preset else module.get_config()
        line = unknown_key(argv, config, path)
    except Exception:  # the config loaded once already; this only improves the message
        line = None
    if line:
        return line
    key = re.findall(r"[\w.]+", str(error).replace("\\n", " "))
    return f"unknown config key {key[0] if key else str(error)!r} in a --config.* override (see {path})"


# Gradient-path knobs that were flat keys before each path got its own section: gradient_paths.<path>_<knob> is now
# gradient_paths.<path>.<knob> for these paths.
FLAT_PATH_KNOBS = re.compile(
    r"^(--?(?:no)?config\.gradient_paths\.)(refl|draft_lv|drtune|direct_align)_(\w+)(.*)$", re.S
)


def with_current_key_names(argv: list[str]) -> list[str]:
    """`argv` with each former flat gradient-path key renamed to its section's key, saying so in one line each."""
    renamed = []
    for argument in argv:
        match = FLAT_PATH_KNOBS.match(argument)
        if match:
            prefix, path, knob, rest = match.groups()
            current = f"{prefix}{path}.{knob}"
            print(f"note: {argument.split('=')[0]} is now {current}", file=sys.stderr)
            argument = current + rest
        renamed.append(argument)
    return renamed


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every configuration error reduced to one line and exit code 2."""
    try:
        args = FLAGS(argv)
        FLAGS.config.keys()  # the config file is loaded lazily: load it now, inside this try
        repeated = repeated_tuple_key(argv, FLAGS.config)
        if repeated:
            fail(
                f"--config.{repeated} is given more than once; ml_collections would join the tuples: give it once, "
                f"with every value, e.g. --config.{repeated}='(a, b)'"
            )
        return args
    except flags.UnrecognizedFlagError as error:
        if str(error.flagname).startswith("config."):
            fail(explain_unknown_key(argv, error))
        fail(f"{error}: no such flag (see {program_name(argv[0])} --help)")
    except flags.Error as error:
        fail(shorten(last_error_line(str(error)), FLAG_ERROR_CHARS))
    except (AttributeError, KeyError) as error:
        fail(explain_unknown_key(argv, error))
    except OSError as error:
        fail(f"cannot load the --config file: {str(error).strip().splitlines()[-1].strip()}")
    except Exception as error:  # the config file's own code failed (a syntax error, a NameError, ...)
        fail(config_file_failed(config_argument(argv) or "", error))


def config_file_failed(spec: str, error: Exception) -> str:
    """One line for a --config file that does not run: which file, where, and Python's reason."""
    path = spec.partition(":")[0]
    if isinstance(error, SyntaxError):
        line, reason = error.lineno, error.msg
    else:
        frames = [frame for frame in traceback.extract_tb(error.__traceback__) if Path(frame.filename) == Path(path)]
        line, reason = (frames[-1].lineno if frames else None), f"{type(error).__name__}: {error}"
    where = f" (line {line})" if line else ""
    return f"the --config file {excerpt(path)} does not run{where}: {shorten(' '.join(reason.split()), 120)}"


# --- keys given on the command line ---------------------------------------------------------------------------


OVERRIDE_ARG = re.compile(r"^--?(?:no)?config\.([^=\s]+)")
RANDOM_STRATEGIES = ("per_step_uniform", "uniform", "gaussian")
# What each of the original's truncation flags allows of a named truncation_strategy.
TRUNCATION_FLAGS = {
    "truncated_backprop": {
        True: ("fixed", *RANDOM_STRATEGIES),
        False: ("full",),
    },
    "truncated_backprop_rand": {
        True: RANDOM_STRATEGIES,
        False: ("fixed", "full"),
    },
}


def repeated_tuple_key(argv: list[str], config) -> str | None:
    """The first tuple-valued key given twice: ml_collections concatenates the values (another key given twice:
    the later value wins, as for any absl flag)."""
    keys = [match.group(1) for match in map(OVERRIDE_ARG.match, given_arguments(argv)) if match]
    for key in dict.fromkeys(keys):
        if keys.count(key) > 1 and isinstance(schema.value_at(config, key), tuple):
            return key
    return None


def explicit_keys(argv: list[str]) -> set[str]:
    """The dotted config keys overridden on the command line (`--config.a.b=1`, `--config.flag`, `--noconfig.flag`)."""
    return {match.group(1) for match in map(OVERRIDE_ARG.match, given_arguments(argv)) if match}


def check_truncation_flags(config, explicit: set[str]) -> None:
    """A named truncation_strategy must agree with every original flag given on the command line (with "auto" the
    flags decide, so nothing can contradict). Without this, one of the two would silently lose."""
    strategy = config.truncation_strategy
    if strategy == "auto":
        return
    where = "--config.truncation_strategy" if "truncation_strategy" in explicit else "the preset's truncation_strategy"
    for flag, allowed in TRUNCATION_FLAGS.items():
        if flag not in explicit or flag not in config or config[flag] not in allowed:
            continue
        value = config[flag]
        if strategy not in allowed[value]:
            raise UserError(
                f"{where}={strategy} contradicts --config.{flag}={value} (which allows "
                f"{' | '.join(allowed[value])}): give one of the two, or truncation_strategy=auto to follow the flags"
            )


# --- the run --------------------------------------------------------------------------------------------------


LINE_CHARS = 120  # printed lines stay readable in a terminal; the files hold every number


def key_numbers(summary: dict) -> dict[str, float]:
    """What is printed of an evaluation: its means (the reward's first, then each metric's and the diversity's);
    the stds and the rest are in the run's files (summary.json, metrics.jsonl, soup.csv)."""
    return {key: value for key, value in summary.items() if key.endswith("_mean") and isinstance(value, float)}


def format_summary(summary: dict, room: int = LINE_CHARS) -> str:
    """`key=value, ...` of the key numbers, as many as fit in `room` characters (the reward always)."""
    items = [f"{key}={value:.4g}" for key, value in key_numbers(summary).items()]
    shown = items[:1]
    for item in items[1:]:
        if len(", ".join([*shown, item, "..."])) > room:
            return ", ".join([*shown, "..."])
        shown.append(item)
    return ", ".join(shown)


def before_after_lines(before: dict, after: dict) -> list[str]:
    """One line per key number: `  name  before -> after`."""
    before, after = key_numbers(before), key_numbers(after)
    width = max(map(len, after), default=0)
    lines = ["evaluation before -> after training (means; every statistic: eval/*/summary.json, metrics.jsonl):"]
    return lines + [f"  {key:<{width}}  {before.get(key, float('nan')):>7.4g} -> {after[key]:.4g}" for key in after]


def report(kind: str, result) -> None:
    """What a person reads at the end: the key numbers, each line short; every number is in the run directory."""
    if kind == "train":
        print("\n".join(before_after_lines(*(evaluation.summary() for evaluation in result))))
    elif kind == "evaluate":
        head = "  eval: "
        print(f"{head}{format_summary(result.summary(), LINE_CHARS - len(head))}")
    else:
        for row in result:
            summary = {k: v for k, v in row.items() if k != "coefficient"}
            head = f"{row['mode']} mixing_coef_1={row['coefficient']:g}: "
            print(f"{head}{format_summary(summary, LINE_CHARS - len(head))}")


WRITTEN = {  # what a job leaves in its run directory (besides config.json), said at the end
    "train": "{final}/, before_after.png, curves.png, metrics.jsonl, checkpoints/, eval/",
    "evaluate": "images/, grid.png, summary.json",
    "soup": "coef_<c>/, soup.csv, soup.json, soup.png",
}


def run_config(config, preset: str = "") -> None:
    """Validate everything, load, create the run directory (said at the start), then train | evaluate | soup;
    `dry_run` only lists the files; `push_to_hub` publishes a trained LoRA. `preset`: the --config value."""
    # Imported here so that `--help` and config errors answer without loading torch.
    from accelerate import PartialState

    from alignprop import jobs

    if config.dry_run:
        from alignprop.dry_run import dry_run

        dry_run(config, preset)
        return
    job, run_dir, result = jobs.run_job(config)
    if PartialState().is_main_process:
        report(job.kind, result)
        final = next((name for name in ("lora", "unet", "transformer") if (run_dir / name).is_dir()), "lora")
        print(f"wrote {WRITTEN[job.kind].format(final=final)} in {run_dir}")
        if job.kind == "train" and config.push_to_hub:
            from alignprop import hub

            before, after = (evaluation.summary() for evaluation in result)
            updates = config.num_epochs * job.batches.updates_per_epoch
            line, uploaded = hub.publish(config, preset, run_dir, updates, before, after)
            print(line, flush=True)
            if not uploaded:  # everything is written; a script must still see that the upload did not happen
                sys.exit(hub.NOT_UPLOADED)


def absl_main(argv) -> None:
    del argv  # absl's leftovers; the overrides are read from sys.argv
    logging.getLogger().setLevel(logging.WARNING)
    try:
        check_truncation_flags(FLAGS.config, explicit_keys(sys.argv))
        schema.check_explicit_settings(FLAGS.config, explicit_keys(sys.argv))
        run_config(FLAGS.config, preset=config_argument(sys.argv) or "")
    except UserError as error:
        fail(str(error))
    except Interrupted as error:  # Ctrl-C: a checkpoint of the last completed update was saved
        print(f"interrupted: {error}", file=sys.stderr)
        sys.exit(130)


def run_command(argv: list[str]) -> None:
    """`PROG compare ...` / `PROG curves ...` (COMMANDS): that module's own command line."""
    prog = f"{program_name(argv[0])} {argv[1]}"
    if argv[1] == "compare":
        from alignprop import compare

        compare.main(argv[2:], prog)
    else:
        from alignprop import curves

        curves.main(argv[2:], prog)


def main() -> None:
    """Entry point of main.py and `python -m alignprop` (reads sys.argv)."""
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        run_command(sys.argv)
        return
    argv = sys.argv = with_current_key_names(sys.argv)
    arguments = given_arguments(argv)
    flag_argv = with_preset_paths(argv)  # sys.argv keeps the --config value as given (the run names it so)
    if HELP_KEYS in arguments:
        try:
            print(keys_text(flag_argv), flush=True)
        except UserError as error:
            fail(str(error))
        sys.exit(0)
    if any(argument in HELP_ARGS for argument in arguments):
        try:
            print(help_text(argv[0]), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    if config_argument(argv) is None:
        print(usage(argv[0]), file=sys.stderr)
        fail(f"no --config given; for the CPU demo: {program_name(argv[0])} --config {preset_spec('tiny')}")
    app.run(absl_main, argv=flag_argv, flags_parser=parse_flags)
