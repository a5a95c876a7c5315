"""The command line: the README's demo command, and one clear line for every bad input."""

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import cli_runner
import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_main(*args, cwd=ROOT, timeout=300, env=None, preexec_fn=None):
    """`python main.py ARGS` in a real subprocess."""
    command = [sys.executable, str(ROOT / "main.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=preexec_fn
    )


def fork_main(*args, cwd=ROOT, timeout=300, env=None):
    """run_main, answered by a child forked from tests/cli_runner.py's helper (torch, diffusers and accelerate
    imported once): ~0.1 s instead of ~7 s, for runs that end at a bad input."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return cli_runner.run([ROOT / "main.py", *args], cwd=cwd, timeout=timeout, env=env)


BAD_INPUTS = {
    "unknown preset": (["--config", "config/align_prop.py:aesthetics"], "unknown preset"),
    "unknown key": (["--config.no_such_key=1"], "unknown config key"),
    "unknown nested key": (["--config.train.no_such_key=1"], "unknown config key"),
    "bad value type": (["--config.steps=many"], "config.steps"),
    "missing config file": (["--config", "config/missing.py:tiny"], "No such file"),
    "unknown reward": (["--config.reward_fn=beauty"], "unknown reward_fn"),
    "unknown prompt set": (["--config.prompt_fn=animals"], "unknown prompt set"),
    "missing prompt file": (["--config.prompt_fn=/nonexistent/prompts.txt"], "does not exist"),
    "indivisible batch": (["--config.train.total_batch_size=6"], "multiple of train.total_batch_size"),
    "capacity does not divide": (["--config.train.batch_size_per_gpu_available=3"], "batch_size_per_gpu_available"),
    "cut out of range": (
        ["--config.steps=10", "--config.truncation_strategy=fixed", "--config.trunc_backprop_timestep=11"],
        "[0, steps=10]",
    ),
    "gaussian never fits": (["--config.truncation_strategy=gaussian"], "almost never"),
    "unknown strategy": (["--config.truncation_strategy=random"], "unknown truncation strategy"),
    "retired model id": (["--config.pretrained.model=runwayml/stable-diffusion-v1-5"], "stable-diffusion-v1-5/"),
    "unknown precision": (["--config.mixed_precision=fp8"], "mixed_precision"),
    "unknown tracker": (["--config.tracker=mlflow"], "tracker"),
    "layout without a single file": (["--config.pretrained.config=tiny"], "drop --config.pretrained.config"),
    # issue 32: settings under which no update changes the weights, or that the chosen mode ignores
    "direct_align discount zero": (
        ["--config.gradient_path=direct_align", "--config.gradient_paths.direct_align.discount=(0,0)"],
        "weights the denoise branch's loss by 0",
    ),
    "direct_align discount 1e300": (
        ["--config.gradient_path=direct_align", "--config.gradient_paths.direct_align.discount=(1e300,1e300)"],
        "direct_align.discount must be a pair (a, b) of finite numbers in [0, 1000]",
    ),
    "warmup longer than the run": (
        ["--config.train.lr_scheduler=linear", "--config.train.lr_warmup_steps=1000"],
        "train.lr_warmup_steps=1000 >= the run's 40 updates",
    ),
    "warmup with the constant schedule": (["--config.train.lr_warmup_steps=5"], "lr_warmup_steps is ignored"),
    "a tuple given twice": (
        ["--config.truncated_backprop_minmax=(0,5)", "--config.truncated_backprop_minmax=(1,9)"],
        "--config.truncated_backprop_minmax is given more than once",
    ),
    "visualize_train without images": (
        ["--config.visualize_train=True", "--config.max_vis_images=0"],
        "max_vis_images=0 saves none",
    ),
    "hub_model_id without push_to_hub": (["--config.hub_model_id=me/model"], "add --config.push_to_hub=True"),
    "hub_model_id not a repo id": (
        ["--config.push_to_hub=True", "--config.hub_model_id=a/b/c d"],
        "hub_model_id='a/b/c d' is not a hub repo id",
    ),
    "knob of another gradient path": (
        ["--config.gradient_paths.drtune.train_steps=999"],
        "is a knob of gradient_path='drtune', but gradient_path='truncation'",
    ),
    "reward_threshold without its loss": (["--config.reward_threshold=0.5"], "reward_loss='threshold' only"),
    "eval reward twice": (["--config.eval_reward_fns=toyworld_area,toyworld_area"], "'toyworld_area' twice"),
    "eval reward is the training reward": (
        ["--config.eval_reward_fns=toyworld_shape"],
        "names the training reward 'toyworld_shape'",
    ),
    "eval combined without a combination": (["--config.eval_reward_fns=combined"], "needs rewards.combination"),
    # issue 32: what fails only once loaded is still the only line (loading bars and warnings held back)
    "T5 length without T5": (["--config.pretrained.max_sequence_length=64"], "without T5: leave it at 0"),
    "eval reward offline": (
        ["--config.eval_reward_fns=aesthetic", "--config.rewards.aesthetic.clip_model=someone/not-cached"],
        "check config.rewards.aesthetic.clip_model",
    ),
    "vae offline": (["--config.pretrained.vae=someone/vae"], "cannot load pretrained.vae 'someone/vae'"),
    # issue 32: a long value is quoted as an excerpt (the line stays under 300 characters)
    "long model id": ([f"--config.pretrained.model=someone/{'m' * 190}"], "HF_HUB_OFFLINE"),
    "long classifier path": ([f"--config.rewards.toyworld.classifier=/no/{'c' * 195}"], "no toy-world shape"),
    "long clip_model": (
        ["--config.eval_reward_fns=aesthetic", f"--config.rewards.aesthetic.clip_model=someone/{'c' * 190}"],
        "cannot load CLIPVisionModelWithProjection",
    ),
}


def assert_one_clear_line(result, fragment, logdir):
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not logdir.exists(), "a configuration error must not create anything under logdir"


def assert_only_one_short_line(result):
    """Nothing but the error line on stderr (no loading bars or warnings before it), under 300 characters."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and len(lines[0]) < 300, result.stderr[-3000:]


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_writes_nothing(case, tmp_path):
    args, fragment = BAD_INPUTS[case]
    if args[0] != "--config":
        args = ["--config", "config/align_prop.py:tiny", *args]
    logdir = tmp_path / "logs"
    result = fork_main(*args, f"--config.logdir={logdir}" if "missing config" not in case else "")
    assert_one_clear_line(result, fragment, logdir)
    assert_only_one_short_line(result)


# refused by jobs.run_job after the heavy imports; refused once the model has loaded
@pytest.mark.parametrize("case", ["unknown reward", "T5 length without T5"])
def test_the_fork_server_answers_a_bad_input_as_python_main_py_does(case, tmp_path):
    args, fragment = BAD_INPUTS[case]
    args = ["--config", "config/align_prop.py:tiny", *args, f"--config.logdir={tmp_path / 'logs'}"]
    real, forked = run_main(*args), fork_main(*args)
    assert_one_clear_line(real, fragment, tmp_path / "logs")
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)


# What the fork server must do as the interpreter does: argv, sys.path[0], __main__, cwd, the environment of the
# request, output written every way, threads joined and atexit callbacks run at the end, and the exit status.
SCRIPT = """
import atexit, os, sys, threading, warnings
print(sys.argv, sys.path[0], __name__, __file__, sys.modules["__main__"].__file__, __spec__, __loader__.name)
print(os.getcwd(), os.environ.get("PYTEST_CURRENT_TEST"), os.environ.get("OMP_NUM_THREADS"))
os.write(2, b"written to fd 2\\n")
warnings.warn("a warning")
atexit.register(print, "at exit")
print("not flushed yet", end="")
threading.Thread(target=print, args=(" by a thread",)).start()
how = sys.argv[1]
if how == "exit":
    sys.exit(int(sys.argv[2]))
if how == "message":
    sys.exit("a message")
if how in ("raise", "interrupt"):
    def fail():
        raise ValueError("the cause")
    try:
        fail()
    except ValueError as error:
        raise (KeyboardInterrupt if how == "interrupt" else RuntimeError)("uncaught") from error
"""


@pytest.mark.parametrize("how", [["return"], ["exit", "3"], ["exit", "0"], ["message"], ["raise"], ["interrupt"]])
def test_the_fork_server_runs_a_script_as_the_interpreter_does(how, tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    argv = [str(tmp_path / "script.py"), *how]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # fork_main's environment: the same helper
    real = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    forked = cli_runner.run(argv, cwd=ROOT, env=env, timeout=60)
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
    assert (how[0] in ("raise", "interrupt")) == ("Traceback" in forked.stderr), forked.stderr


def test_the_fork_server_kills_a_child_at_its_timeout(tmp_path):
    (tmp_path / "script.py").write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with pytest.raises(subprocess.TimeoutExpired) as expired:
        cli_runner.run([tmp_path / "script.py"], cwd=ROOT, env=env, timeout=1)
    assert expired.value.output == b"started\n"  # bytes, as from subprocess.run


def checkpoint_dir(tmp_path, marker=True, lora=b"not safetensors"):
    """A checkpoint_1 directory with garbage files, with or without its completion marker."""
    from alignprop import checkpoint
    from alignprop.lora_files import LORA_FILE_NAME

    path = tmp_path / "old" / "checkpoints" / "checkpoint_1"
    path.mkdir(parents=True)
    (path / LORA_FILE_NAME).write_bytes(lora)
    (path / checkpoint.STATE_FILE).write_bytes(b"garbage")
    if marker:
        files = [LORA_FILE_NAME, checkpoint.STATE_FILE]
        info = {"format": 1, "epoch": 1, "update": 2, "num_processes": 1, "files": files}
        (path / checkpoint.MARKER_FILE).write_text(json.dumps(info))
    return path


def a_file(tmp_path, text="", name="file"):
    (tmp_path / name).write_text(text)
    return tmp_path / name


BROKEN_CONFIG = "def get_config(preset):\n    return (\n"  # a Python file that does not parse
FLOW_LAYOUT = ROOT / "assets" / "toyworld" / "flow_pipeline"  # a flow-matching (SD3) pipeline's layout


def single_file(tmp_path):
    """The tiny SD pipeline as one file in the original checkpoint layout (tests/test_single_file.py)."""
    from safetensors.torch import save_file
    from test_single_file import original_checkpoint

    from alignprop.tiny import tiny_pipeline_dir

    save_file(original_checkpoint(tiny_pipeline_dir()), tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors"


# name: (tmp_path -> extra args, fragment of the error line); these need files made first.
BAD_FILES = {
    "resume_from missing": (lambda t: [f"--config.resume_from={t / 'nowhere'}"], "does not exist"),
    "resume_from empty": (lambda t: [f"--config.resume_from={t}"], "holds no complete checkpoint"),
    "resume_from incomplete": (
        lambda t: [f"--config.resume_from={checkpoint_dir(t, marker=False)}"],
        "incomplete checkpoint",
    ),
    "resume_from corrupt": (lambda t: [f"--config.resume_from={checkpoint_dir(t)}"], "cannot read LoRA weights"),
    "unwritable logdir": (lambda t: [f"--config.logdir={a_file(t) / 'logs'}"], "cannot create the run directory"),
    "offline uncached model": (lambda t: ["--config.pretrained.model=someone/not-cached"], "HF_HUB_OFFLINE"),
    "config file with a syntax error": (
        lambda t: ["--config", str(a_file(t, BROKEN_CONFIG, "broken.py")) + ":tiny"],
        "does not run (line 2): '(' was never closed",  # a long temporary path is cut before its name
    ),
    "single file with another family's layout": (
        lambda t: [f"--config.pretrained.model={single_file(t)}", f"--config.pretrained.config={FLOW_LAYOUT}"],
        "pretrained.config must be a pipeline of the file's family and size",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_are_one_clear_line_and_write_nothing(case, tmp_path):
    make_args, fragment = BAD_FILES[case]
    logdir = tmp_path / "logs"
    args = [f"--config.logdir={logdir}", *make_args(tmp_path)]  # a later --config.logdir wins
    result = fork_main("--config", "config/align_prop.py:tiny", *args, env={"HF_HUB_OFFLINE": "1"})
    assert_one_clear_line(result, fragment, logdir)
    assert_only_one_short_line(result)


def test_a_full_disk_at_start_up_is_one_clear_line_and_leaves_no_run_directory(tmp_path):
    # A 1 KiB file-size limit: config.json (a few KiB, the first file of a run) fails with EFBIG, as on a full
    # disk (Python ignores SIGXFSZ). ENOSPC itself needs a file system that is really full.
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    logdir = tmp_path / "logs"
    args = ["--config", "config/align_prop.py:tiny", f"--config.logdir={logdir}", "--config.run_name=demo"]
    result = run_main(*args, preexec_fn=small_files)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: cannot write {logdir / 'demo' / 'config.json'}: File too large [EFBIG]; free space in {logdir}, "
        "then start it again"
    ]
    assert list(logdir.iterdir()) == []


def test_fp16_on_a_cpu_falls_back_to_fp32_with_one_warning(tmp_path):
    # A dry run validates the whole config and trains nothing: the warning comes once validation has passed.
    logdir = tmp_path / "logs"
    args = ["--config.mixed_precision=fp16", "--config.dry_run=True", f"--config.logdir={logdir}"]
    result = run_main("--config", "config/align_prop.py:tiny", *args, env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "mixed_precision=fp16 needs a GPU" in line]
    assert warnings == [warnings[0]] and "running in fp32" in warnings[0], result.stderr
    # With a bad input the error is the only line (no warning before it).
    bad = run_main(
        "--config",
        "config/align_prop.py:tiny",
        *args[:1],
        "--config.prompt_fn=animals",
        f"--config.logdir={logdir}",
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert_one_clear_line(bad, "unknown prompt set", logdir)


def test_readme_demo_command(tmp_path):
    # The README's command, cut to one epoch: tests/test_train.py runs the whole demo (in-process, once).
    args = ["--config", "config/align_prop.py:tiny", "--config.num_epochs=1", "--config.save_freq=1"]
    result = run_main(*args, f"--config.logdir={tmp_path}", "--config.run_name=demo")
    assert result.returncode == 0, result.stderr[-2000:]
    # The summary: one short line per mean, before -> after; the learned reward beside the ground truth it can be
    # checked against. Every statistic stays in the files (eval/*/summary.json, metrics.jsonl).
    summary = result.stdout.split("evaluation before -> after training", 1)[1].split("\nwrote ", 1)[0].splitlines()
    number = r"-?\d[\d.e+-]*"
    assert re.fullmatch(rf"  reward_mean +{number} -> {number}", summary[1]), summary
    assert any(re.fullmatch(rf"  checker_shape_mean +{number} -> {number}", line) for line in summary), summary
    assert all(len(line) <= 120 for line in summary) and not any("_std" in line for line in summary), summary
    run_dir = tmp_path / "demo"
    for name in ("config.json", "metrics.jsonl", "before_after.png"):
        assert (run_dir / name).exists(), name
