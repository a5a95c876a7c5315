"""A newcomer's first commands: --help, no --config, a mistyped key, `python -m alignprop`, `pip install -e .`,
--config.tracker=tensorboard, and the toy pipeline in plain diffusers (the README's snippet)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "config/align_prop.py"
TOY_PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


def run(*args, module=False, cwd=ROOT, timeout=300):
    command = [sys.executable, *(["-m", "alignprop"] if module else [str(ROOT / "main.py")]), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def presets():
    """{name: first line of its function's docstring} of config/align_prop.py."""
    spec = importlib.util.spec_from_file_location("presets_under_test", ROOT / CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: getattr(module, name).__doc__.strip().splitlines()[0] for name in module.PRESETS}


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# --- help, and no --config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_exits_0_and_lists_every_preset_with_its_line(flag):
    result = run(flag)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("AlignProp: ")
    assert f"usage: python main.py --config {CONFIG}:PRESET" in result.stdout
    for name, line in presets().items():
        assert re.search(rf"^  {name} +{re.escape(line)}$", result.stdout, flags=re.MULTILINE), (name, result.stdout)


def test_every_preset_has_a_one_line_description():
    assert all(len(line) > 20 for line in presets().values()), presets()


def test_no_config_prints_the_usage_and_runs_nothing(tmp_path):
    # The demo must not start unasked (a forgotten --config under `accelerate launch` would train the toy model).
    result = run(cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # Started by its path from elsewhere: main.py by that path, the preset by its name alone (runs from there).
    assert f"usage: python {ROOT / 'main.py'} --config PRESET" in result.stderr and "  tiny " in result.stderr
    demo = f"python {ROOT / 'main.py'} --config tiny"
    assert error_lines(result) == [f"error: no --config given; for the CPU demo: {demo}"]
    assert list(tmp_path.iterdir()) == [], "nothing may be written"


# --- a mistyped key --------------------------------------------------------------------------------------------

UNKNOWN_KEYS = {
    "--config.num_epoch=1": "unknown config key 'num_epoch'; did you mean 'num_epochs'?",
    "--config.train.learning_rat=1": "unknown config key 'train.learning_rat'; did you mean 'train.learning_rate'?",
    "--config.trainx.learning_rate=1": "unknown config key 'trainx'; did you mean 'train'?",
    "--config.rewards.hps.versoin=v2.1": (
        "unknown config key 'rewards.hps.versoin'; did you mean 'rewards.hps.version'?"
    ),
    "--config.zzz=1": "unknown config key 'zzz'",
    "--config.gradient_paths.refl.last_step=(1,2)": (
        "unknown config key 'gradient_paths.refl.last_step'; did you mean 'gradient_paths.refl.last_steps'?"
    ),
    "--config.gradient_paths.refl_last_step=(1,2)": (  # a former flat name, mistyped: the suggestion is the new key
        "unknown config key 'gradient_paths.refl.last_step'; did you mean 'gradient_paths.refl.last_steps'?"
    ),
    "--config.log_with=wandb": "unknown config key 'log_with'; did you mean 'tracker'?",  # accelerate's name
    "--config.refl_last_steps=(1,5)": (  # flat, at the top: the key it spells
        "unknown config key 'refl_last_steps'; did you mean 'gradient_paths.refl.last_steps'?"
    ),
    "--config.rank=8": "unknown config key 'rank'; did you mean 'lora.rank'?",
    "--config.fold_lora=True": "config key 'fold_lora' was removed: it gave no measurable speed "
    "(benchmarks/README.md); compile_denoiser is the faster switch",
}


@pytest.mark.parametrize("override", sorted(UNKNOWN_KEYS))
def test_an_unknown_key_is_one_clean_line_with_the_suggestion(override, tmp_path):
    result = run("--config", f"{CONFIG}:tiny", override, f"--config.logdir={tmp_path / 'logs'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_lines(result) == [f"error: {UNKNOWN_KEYS[override]} (see {CONFIG})"], result.stderr
    assert "\\" not in result.stderr
    assert not (tmp_path / "logs").exists()


def test_a_former_flat_gradient_path_key_works_and_names_its_new_key(tmp_path):
    """gradient_paths.<path>_<knob> became gradient_paths.<path>.<knob>: the old spelling is read as the new key."""
    flat = "--config.gradient_paths.refl_last_steps=(2,30)"
    result = run("--config", f"{CONFIG}:tiny", flat, "--config.gradient_path=refl", "--config.dry_run=True")
    assert (
        "note: --config.gradient_paths.refl_last_steps is now --config.gradient_paths.refl.last_steps" in result.stderr
    )
    # read as the new key: (2, 30) with the preset's 20 steps is refused by the path's own check, under the new name
    assert error_lines(result) == [
        "error: gradient_paths.refl.last_steps=(2, 30) must satisfy 1 <= min <= max <= steps=20 "
        "(k-th step from the end; 1 = the last)"
    ], result.stderr


# --- python -m alignprop and pip install -e . ------------------------------------------------------------------


def test_python_m_alignprop_is_the_same_command_line(tmp_path):
    result = run("--help", module=True)
    assert result.returncode == 0 and "usage: python -m alignprop --config" in result.stdout
    assert all(f"  {name} " in result.stdout for name in presets())
    mistyped = ["--config", f"{CONFIG}:tiny", "--config.num_epoch=1", f"--config.logdir={tmp_path}"]
    assert error_lines(run(*mistyped, module=True)) == error_lines(run(*mistyped))


def test_pyproject_makes_an_installable_package_with_the_pins_of_requirements_txt():
    # `pip install -e . --no-deps` itself needs PyPI for the build backend (tests run offline); setuptools reads
    # the same configuration here, dynamic fields expanded.
    from setuptools.config.pyprojecttoml import read_configuration

    import alignprop

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "alignprop" and project["requires-python"] == ">=3.11"
    expanded = read_configuration(ROOT / "pyproject.toml", expand=True)
    requirements = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip()]
    assert expanded["project"]["dependencies"] == requirements
    assert expanded["project"]["version"] == alignprop.__version__
    packages = expanded["tool"]["setuptools"]["packages"]
    assert {"alignprop", "alignprop.rewards", "alignprop.toyworld"} <= set(packages), packages
    module, _, function = expanded["project"]["scripts"]["alignprop"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_every_tracker_is_a_pinned_requirement():
    requirements = (ROOT / "requirements.txt").read_text()
    for package in ("wandb", "tensorboard"):
        assert re.search(rf"^{package}==[\d.]+$", requirements, flags=re.MULTILINE), package


# --- tracker=tensorboard ----------------------------------------------------------------------------------------


def test_tensorboard_tracker_writes_the_eval_scalars_and_grid(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TOY_PROMPTS) + "\n")
    args = ["--config", f"{CONFIG}:tiny", "--config.only_eval=True", "--config.resume_from=stablediffusion"]
    args += ["--config.tracker=tensorboard", f"--config.eval_prompt_fn=from_file:{prompts}"]
    result = run(*args, f"--config.logdir={tmp_path / 'logs'}", "--config.run_name=tb")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "logs" / "tb"
    events = sorted(run_dir.rglob("events.out.tfevents.*"))
    assert events, f"no event files under {run_dir}"
    scalars, images = {}, set()
    for directory in {path.parent for path in events}:
        accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
        accumulator.Reload()
        scalars |= {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}
        images |= set(accumulator.Tags()["images"])
    summary = json.loads((run_dir / "summary.json").read_text())
    for name in ("reward_mean", "reward_std", "checker_shape_mean"):
        (event,) = scalars[f"eval/{name}"]
        assert event.value == pytest.approx(summary[name], rel=1e-6), name
    assert "eval/grid" in images, images


# --- the toy pipeline in plain diffusers ------------------------------------------------------------------------


def readme_toy_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    (snippet,) = [block for block in blocks if 'from_pretrained("assets/toyworld/pipeline")' in block]
    return snippet


def test_the_readme_toy_world_snippet_runs_in_plain_diffusers_and_follows_the_prompt(monkeypatch):
    from alignprop.toyworld.control import grade

    monkeypatch.chdir(ROOT)
    snippet = readme_toy_snippet()
    assert "64" not in snippet  # the latent size comes from the pipeline
    namespace = {}
    exec(snippet, namespace)
    image = namespace["image"]
    assert image.size == (32, 32) and namespace["pipe"].text_encoder.dtype == torch.float32
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float32).T.reshape(1, 3, 32, 32) / 127.5 - 1
    assert grade(pixels, ["a red circle on a blue background"])["prompt"] == 1.0


def test_the_plain_stock_call_samples_on_a_cpu():
    # Under transformers 5 an fp16 text encoder loads as fp16 beside the float32 UNet/VAE: "Half and Float".
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "assets" / "toyworld" / "pipeline")
    images = pipe(TOY_PROMPTS[0], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_the_text_encoder_weights_are_exactly_fp16_values():
    # Stored in float32 for the plain call above, but every value is an fp16 number: loading it in fp16 (GPU
    # presets) or upcasting it gives the same model as the fp16 file it replaced.
    from safetensors.torch import load_file

    weights = load_file(ROOT / "assets" / "toyworld" / "pipeline" / "text_encoder" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    assert all(torch.equal(tensor.half().float(), tensor) for tensor in weights.values())


def test_help_keys_lists_every_key_with_its_default_and_what_it_takes():
    """--help-keys [PREFIX]: one line per key from the schema (no torch), the base config's defaults or a preset's."""
    from alignprop.presets import load_preset
    from alignprop.schema import RULES, leaves

    every = run("--help-keys")
    assert every.returncode == 0, every.stderr
    listed = [line.split(" = ")[0] for line in every.stdout.splitlines()]
    base = load_preset("tiny")  # the keys every preset shares
    assert listed == [key for key, _ in leaves(base)] and all(key in RULES for key in listed)
    refl = run("--help-keys", "gradient_paths.refl")
    assert refl.stdout.splitlines() == [
        "gradient_paths.refl.last_steps = (1, 10): " + RULES["gradient_paths.refl.last_steps"].expected(),
        "gradient_paths.refl.uncond_gradient = False: True or False",
    ]
    flux = run("--config", f"{CONFIG}:hps_flux", "--help-keys", "steps")
    assert flux.stdout.startswith("steps = 25: an integer in [1, 1000]")
    unknown = run("--help-keys", "zzz")
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines() == [
        "error: no config key starts with 'zzz'; --help-keys alone lists them all"
    ]


# --- what a run prints at the end ------------------------------------------------------------------------------


def test_the_printed_results_are_short_lines_that_lead_with_the_reward(capsys):
    from types import SimpleNamespace

    from alignprop import cli

    metrics = {f"checker_{name}": 0.123456 for name in ("background", "colour", "shape", "prompt", "area", "x", "y")}
    summary = {
        "reward_mean": 0.81234,
        "reward_std": 0.3,
        **{f"{k}_{s}": v for k, v in metrics.items() for s in "mean std".split()},
    }
    cli.report("evaluate", SimpleNamespace(summary=lambda: summary))
    cli.report("soup", [{"mode": "params", "coefficient": 0.5, **summary}])
    cli.report(
        "train",
        [SimpleNamespace(summary=lambda: summary), SimpleNamespace(summary=lambda: {**summary, "reward_mean": 0.9})],
    )
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 120 for line in lines) and not any("_std" in line for line in lines), lines
    assert lines[0].startswith("  eval: reward_mean=0.8123, checker_background_mean=0.1235, ") and lines[0].endswith(
        ", ..."
    )
    assert lines[1].startswith("params mixing_coef_1=0.5: reward_mean=0.8123, ")
    assert re.fullmatch(r"  reward_mean +0\.8123 -> 0\.9", lines[3]), lines
    assert len(lines) == 3 + 1 + len(metrics)  # the train summary: a heading, then every mean on its own line
