"""AlignProp: fine-tune a text-to-image diffusion model by backpropagating a differentiable reward.

accelerate launch main.py --config config/align_prop.py:aesthetic
python main.py --config config/align_prop.py:tiny          # CPU demo, no downloads
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from alignprop.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "config/align_prop.py:tiny", "Preset: path/to/config.py:PRESET.")


def run(config) -> None:
    # Imported here so that `--help` and config errors answer without loading torch.
    from alignprop import runtime, train
    from alignprop.rundir import create_run_dir

    if config.only_eval:
        raise UserError("evaluation (only_eval / the evaluate presets) is not available yet in this version")
    plan = runtime.validate(config, runtime.process_count())
    run_dir = create_run_dir(config.logdir, config.run_name)
    (run_dir / "config.json").write_text(config.to_json_best_effort(indent=2))
    before, after = train.train(config, plan, run_dir)
    print(f"run directory: {run_dir}")
    for label, result in (("before", before), ("after", after)):
        summary = ", ".join(f"{key}={value:.4g}" for key, value in result.summary().items())
        print(f"{label:>6}: {summary}")


def main(argv) -> None:
    del argv
    logging.getLogger().setLevel(logging.WARNING)
    try:
        run(FLAGS.config)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
