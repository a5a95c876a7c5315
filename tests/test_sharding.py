"""sharding=fsdp (FSDP2 on CPU with gloo, real processes under torchrun): the same training as unsharded, half of the
trained parameters and of AdamW's state on each of 2 processes, checkpoints that resume on 2 processes bit for bit
and on 1 process (unsharded) to the same update, and the command line end to end (evaluation, EMA, export)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignprop import checkpoint
from alignprop.denoiser_files import is_denoiser_folder
from alignprop.errors import UserError
from alignprop.pause import PAUSE_ENV

ROOT = Path(__file__).resolve().parent.parent
CASES = [f"{model}:{finetune}" for model in ("toyworld", "tiny_sd3", "tiny_flux") for finetune in ("lora", "full")]
RESUMED = ["toyworld:lora", "toyworld:full"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


def torchrun(processes: int, *args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 updates of every case, sharded (checkpoint after the first) and not; then the sharded checkpoints resumed
    for the second update on 2 processes sharded and on 1 process unsharded."""
    root = tmp_path_factory.mktemp("sharding")
    worker = "tests/fsdp_worker.py"
    torchrun(2, worker, str(root / "fsdp"), "fsdp+save", "2", *CASES)
    torchrun(2, worker, str(root / "none"), "none", "2", *CASES)
    torchrun(2, worker, str(root / "resumed_fsdp"), f"resume:fsdp:{root / 'fsdp'}", "1", *RESUMED)
    one = torchrun(1, worker, str(root / "resumed_one"), f"resume:none:{root / 'fsdp'}", "1", *RESUMED)
    return root, one.stdout


def load(root: Path, run: str, case: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / run / case.replace(":", "_") / f"{name}.safetensors"))


def worst_relative_error(expected: dict, got: dict) -> float:
    assert expected.keys() == got.keys()
    return max(float((got[k] - expected[k]).norm() / expected[k].norm().clamp_min(1e-30)) for k in expected)


@pytest.mark.parametrize("case", CASES)
def test_sharded_training_equals_unsharded(runs, case):
    root, _ = runs
    gradients = load(root, "none", case, "first_gradients")
    assert sum(bool(g.abs().max() > 0) for g in gradients.values()) > len(gradients) / 3, "too little gradient"
    assert worst_relative_error(gradients, load(root, "fsdp", case, "first_gradients")) <= 1e-5
    assert worst_relative_error(load(root, "none", case, "weights"), load(root, "fsdp", case, "weights")) <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_each_process_holds_half_of_the_trained_parameters_and_of_adams_state(runs, case):
    root, _ = runs
    for run, share in (("fsdp", 0.5), ("none", 1.0)):
        counts = [json.loads((root / run / case.replace(":", "_") / f"local_{r}.json").read_text()) for r in (0, 1)]
        total = counts[0]["total_params"]
        for count in counts:
            assert abs(count["params"] / total - share) < 0.05, (run, count)
            assert count["optimizer"] == 2 * count["params"], (run, count)  # exp_avg and exp_avg_sq
        if run == "fsdp":
            assert counts[0]["params"] + counts[1]["params"] == total


@pytest.mark.parametrize("case", RESUMED)
def test_a_sharded_checkpoint_resumes_bit_for_bit_on_the_same_process_count(runs, case):
    root, _ = runs
    straight, resumed = load(root, "fsdp", case, "weights"), load(root, "resumed_fsdp", case, "weights")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("case", RESUMED)
def test_a_sharded_checkpoint_resumes_on_one_unsharded_process(runs, case):
    root, stdout = runs
    assert worst_relative_error(load(root, "fsdp", case, "weights"), load(root, "resumed_one", case, "weights")) <= 1e-5
    assert "was written by 2 processes, this launch has 1" in stdout


def test_fsdp_full_fine_tuning_from_the_command_line(tmp_path):
    """main.py under torchrun: uneven evaluation shares (3 captions on 2 processes, one per batch: 2 and 1 batches),
    EMA, checkpoints and the exported UNet; both processes end with the same weights."""
    prompts = tmp_path / "eval.txt"
    prompts.write_text(
        "\n".join(f"a {c} on a white background" for c in ("red circle", "blue square", "green triangle"))
    )
    torchrun(
        2, "main.py", "--config", "config/align_prop.py:tiny", f"--config.logdir={tmp_path}", "--config.run_name=fsdp",
        "--config.sharding=fsdp", "--config.train.finetune=full", "--config.train.ema_decay=0.9",
        "--config.train.learning_rate=1e-4", f"--config.eval_prompt_fn={prompts}", "--config.steps=4",
        "--config.truncated_backprop_minmax=(0,4)", "--config.num_epochs=1", "--config.save_freq=1",
        "--config.train.batch_size_per_gpu_available=1", "--config.train.total_batch_size=2",
        "--config.block_checkpoint=True", "--config.train.no_grad_batch_size=2",
        "--config.train.total_samples_per_epoch=4",
    )  # fmt: skip
    run_dir = tmp_path / "fsdp"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records if "grad_norm" in r] == [1, 2]
    evaluations = [r for r in records if r.get("eval")]
    assert [r["update"] for r in evaluations] == [0, 2] and all("reward_mean" in r for r in evaluations)
    digests = records[-1]["weights_sha256_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert is_denoiser_folder(run_dir / "unet")
    saved = run_dir / "checkpoints" / "checkpoint_1"
    assert is_denoiser_folder(saved / "unet") and is_denoiser_folder(saved / "ema" / "unet")
    final, average = (load_file(str(d / WEIGHTS)) for d in (run_dir / "unet", saved / "ema" / "unet"))
    assert all(torch.equal(final[k], average[k]) for k in final)


@pytest.mark.parametrize(
    "name, model, guidance",
    [
        ("hps_sd35_full", "stabilityai/stable-diffusion-3.5-medium", 3.5),
        ("hps_flux_full", "black-forest-labs/FLUX.1-dev", 4.0),
    ],
)
def test_full_fine_tuning_presets_validate_on_8_processes(preset, monkeypatch, name, model, guidance):
    """FlowBP's setup (README "Scaling out" cites each value): full, fsdp, 512 px, 25 steps, lr 1e-5, wd 1e-4, clip 1,
    EMA 0.995, relu(0.55 - HPS v2.1), 64 samples per update as 8 GPUs x 1 x 8 accumulated passes."""
    from alignprop import runtime

    monkeypatch.setattr(runtime, "check_model_available", lambda *args: None)  # no hub cache on CI
    config = preset(name)
    batches = runtime.validate(config, num_processes=8)
    assert (config.pretrained.model, config.sd_guidance_scale, config.steps, config.resolution) == (
        model,
        guidance,
        25,
        512,
    )
    assert (config.train.finetune, config.sharding, config.gradient_path) == ("full", "fsdp", "flowbp_lagrange")
    train = config.train
    assert (train.learning_rate, train.adam_weight_decay, train.max_grad_norm, train.ema_decay) == (
        1e-5,
        1e-4,
        1,
        0.995,
    )
    assert (config.reward_loss, config.reward_threshold, config.rewards.hps.version) == ("threshold", 0.55, "v2.1")
    assert (batches.batch_size, batches.gradient_accumulation_steps, batches.updates_per_epoch) == (1, 8, 100)


def fsdp_run_command(logdir: Path, run_name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py",
        "--config", "config/align_prop.py:tiny", f"--config.logdir={logdir}", f"--config.run_name={run_name}",
        "--config.sharding=fsdp", "--config.train.finetune=full", "--config.steps=4",
        "--config.truncated_backprop_minmax=(0,4)", "--config.vis_freq=0", "--config.save_freq=1",
        "--config.train.total_samples_per_epoch=8", *extra,
    ]  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first."""
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [grandchild for child in children for grandchild in (child, *descendants(child))]


def test_sigkill_during_a_sharded_save_leaves_the_previous_checkpoint_intact(tmp_path):
    """Every process has written its shards and the main process the weights and training state, not yet marked or
    renamed (the test hook holds it there): SIGKILL to the whole launch leaves no checkpoint in that run, and the
    checkpoint it resumed from untouched."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(fsdp_run_command(tmp_path, "first", "--config.num_epochs=1"), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    saved = checkpoint.resolve(str(tmp_path / "first"))
    before = sorted((str(p.relative_to(saved.path)), p.stat().st_mtime_ns) for p in saved.path.rglob("*"))
    resume = ["--config.num_epochs=2", f"--config.resume_from={tmp_path / 'first'}"]
    command, paused = fsdp_run_command(tmp_path, "second", *resume), {**env, PAUSE_ENV: "save:120"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=paused, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    root, deadline = tmp_path / "second" / "checkpoints", time.monotonic() + 300
    while not any((p / checkpoint.STATE_FILE).exists() for p in root.glob(f"{checkpoint.TEMP_PREFIX}*")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out waiting for the save"
        time.sleep(0.1)
    staging = next(root.glob(f"{checkpoint.TEMP_PREFIX}*"))
    assert (staging / checkpoint.SHARDED_DIR / "__1_0.distcp").exists()  # both processes' shards were written
    for pid in [*descendants(process.pid), process.pid]:  # torchrun's workers are not in its process group
        os.kill(pid, signal.SIGKILL)
    process.communicate(timeout=60)
    with pytest.raises(UserError, match="holds no complete checkpoint"):
        checkpoint.resolve(str(tmp_path / "second"))
    assert sorted((str(p.relative_to(saved.path)), p.stat().st_mtime_ns) for p in saved.path.rglob("*")) == before


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"compile_denoiser": "default"}, "set compile_denoiser=off"),
        ({"mixed_precision": "fp16"}, "mixed_precision=bf16 or no"),
        ({"train.use_8bit_adam": True}, "AdamW8bit does not take sharded tensors"),
    ],
)
def test_settings_sharding_cannot_honour_are_one_line(preset, tmp_path, overrides, words):
    from small_runs import assert_one_line_before_the_run_directory, small_config

    config = small_config(preset, tmp_path, sharding="fsdp", **overrides)
    assert_one_line_before_the_run_directory(config, tmp_path, words)
