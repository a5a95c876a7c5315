"""AlignProp: fine-tune a text-to-image diffusion model by backpropagating a differentiable reward.

accelerate launch main.py --config config/align_prop.py:aesthetic
accelerate launch main.py --config config/align_prop.py:aesthetic --config.resume_from=logs/RUN
accelerate launch main.py --config config/align_prop.py:evaluate --config.resume_from=logs/RUN
python main.py --config config/align_prop.py:evaluate_soup --config.resume_from=logs/A --config.resume_from_2=logs/B
python main.py --config config/align_prop.py:tiny          # CPU demo, no downloads
"""

import logging
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from alignprop.errors import Interrupted, UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "config/align_prop.py:tiny", "Preset: path/to/config.py:PRESET.")


def format_summary(summary: dict) -> str:
    return ", ".join(f"{key}={value:.4g}" for key, value in summary.items() if isinstance(value, float))


def report(kind: str, result) -> None:
    """What a person reads at the end: the numbers; the files are in the run directory."""
    if kind == "train":
        for label, evaluation in zip(("before", "after"), result):
            print(f"{label:>6}: {format_summary(evaluation.summary())}")
    elif kind == "evaluate":
        print(f"  eval: {format_summary(result.summary())}")
    else:
        for row in result:
            summary = {k: v for k, v in row.items() if k != "coefficient"}
            print(f"{row['mode']} mixing_coef_1={row['coefficient']:g}: {format_summary(summary)}")


def run(config) -> None:
    """Validate everything, create the run directory, then train | evaluate | soup."""
    # Imported here so that `--help` and config errors answer without loading torch.
    from accelerate import PartialState

    from alignprop import jobs

    job, run_dir, result = jobs.run(config)
    if PartialState().is_main_process:
        print(f"run directory: {run_dir}")
        report(job.kind, result)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def last_error_line(text: str) -> str:
    """The final 'SomethingError: message' line of an absl/ml_collections error text, else its first line."""
    matches = re.findall(r"^\s*\w*(?:Error|Exception): (.+)$", text, flags=re.MULTILINE)
    return matches[-1] if matches else text.strip().splitlines()[0]


def parse_flags(argv):
    """absl's flag parsing, with every configuration error reduced to one line and exit code 2."""
    try:
        args = FLAGS(argv)
        FLAGS.config.keys()  # the config file is loaded lazily: load it now, inside this try
        return args
    except flags.UnrecognizedFlagError as error:
        fail(f"{error}: no such flag or config key (see config/align_prop.py for the keys)")
    except flags.Error as error:
        fail(last_error_line(str(error)))
    except (AttributeError, KeyError) as error:
        key = str(error).strip("\"'")
        fail(f"unknown config key {key!r} in a --config.* override (see config/align_prop.py for the keys)")
    except OSError as error:
        fail(f"cannot load the --config file: {str(error).strip().splitlines()[-1].strip()}")


def main(argv) -> None:
    del argv
    logging.getLogger().setLevel(logging.WARNING)
    try:
        run(FLAGS.config)
    except UserError as error:
        fail(str(error))
    except Interrupted as error:  # Ctrl-C: a checkpoint of the last completed update was saved
        print(f"interrupted: {error}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
