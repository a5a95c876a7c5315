"""Data-parallel training with accelerate's multi-CPU (gloo) mode: real processes started by torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def torchrun(processes: int, *args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # N processes on 2 cores: no oversubscription
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_process_tiny_run_writes_one_set_of_outputs_and_ranks_agree(tmp_path):
    torchrun(
        2,
        "main.py",
        "--config",
        "config/align_prop.py:tiny",
        f"--config.logdir={tmp_path}",
        "--config.run_name=ddp",
        "--config.num_epochs=2",
        "--config.vis_freq=2",
    )
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"], "exactly one run directory"
    run_dir = tmp_path / "ddp"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if "grad_norm" in r]
    assert [r["update"] for r in updates] == [1, 2, 3, 4], "each update logged once, by the main process"
    digests = records[-1]["weights_sha256_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1], "both ranks must hold bit-identical LoRA weights"
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (run_dir / "checkpoints").is_dir()


@pytest.mark.parametrize("model", ["tiny_sdxl", "tiny_flux"])
def test_two_process_run_of_another_family_keeps_the_ranks_in_step(tmp_path, model):
    """SDXL (two text encoders, time ids) and FLUX (flow matching, packed latents) under the same data-parallel
    path."""
    torchrun(
        2,
        "main.py",
        "--config",
        "config/align_prop.py:tiny",
        f"--config.logdir={tmp_path}",
        "--config.run_name=family",
        f"--config.pretrained.model={model}",
        "--config.reward_fn=compressibility",
        "--config.prompt_fn=simple_animals",
        "--config.eval_prompt_fn=eval_simple_animals",
        "--config.steps=4",
        "--config.truncated_backprop_minmax=(0,4)",
        "--config.num_epochs=1",
    )
    records = [json.loads(line) for line in (tmp_path / "family" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records if "grad_norm" in r] == [1, 2]
    digests = records[-1]["weights_sha256_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1]


@pytest.mark.parametrize(
    "path, knobs",
    [
        ("drtune", ["--config.gradient_paths.drtune.train_steps=2"]),  # sparse steps, detached denoiser inputs
        ("leapalign", []),  # a per-sample weight, two trained steps
        ("direct_align", []),  # two branches, the reward the other way round on one
        ("truncation", ["--config.train.finetune=full"]),  # every UNet weight trained, averaged by hand
    ],
)
def test_two_process_run_of_another_gradient_path_keeps_the_ranks_in_step(tmp_path, path, knobs):
    """Other gradient paths under the same data-parallel path: the ranks stay identical."""
    torchrun(
        2,
        "main.py",
        "--config",
        "config/align_prop.py:tiny",
        f"--config.logdir={tmp_path}",
        f"--config.run_name={path}",
        f"--config.gradient_path={path}",
        *knobs,
        "--config.num_epochs=1",
        "--config.vis_freq=0",
    )
    records = [json.loads(line) for line in (tmp_path / path / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if "grad_norm" in r]
    assert [r["update"] for r in updates] == [1, 2] and all(r["grad_norm"] > 0 for r in updates)
    digests = records[-1]["weights_sha256_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (tmp_path / path / ("unet" if knobs == ["--config.train.finetune=full"] else "lora")).is_dir()


SPLITS = {  # processes, per-process capacity: all make updates of the same 4 pinned samples
    "1x4": (1, 4),
    "1x2 accumulate 2": (1, 2),
    "2x2": (2, 2),
    "2x1 accumulate 2": (2, 1),
}


@pytest.fixture(scope="module")
def results_by_split(tmp_path_factory):
    results = {}
    for name, (processes, capacity) in SPLITS.items():
        out = tmp_path_factory.mktemp(name.replace(" ", "_")) / "lora"
        torchrun(processes, "tests/distributed_worker.py", str(out), str(capacity), "4", "2")
        results[name] = (
            load_file(str(out / "first_gradients.safetensors")),
            load_file(str(out / "pytorch_lora_weights.safetensors")),
        )
    return results


@pytest.mark.parametrize("name", [n for n in SPLITS if n != "1x4"])
def test_any_split_of_the_batch_gives_the_same_gradient(results_by_split, name):
    reference, other = results_by_split["1x4"][0], results_by_split[name][0]
    assert reference.keys() == other.keys()
    nonzero = [k for k in reference if reference[k].abs().max() > 0]
    assert nonzero, "no gradient at all: the comparison would prove nothing"
    for key in nonzero:  # float32 sums in another order, batches of other sizes
        error = float((other[key] - reference[key]).norm() / reference[key].norm())
        assert error < 1e-4, f"{name}: {key} relative gradient error {error:.2e}"


@pytest.mark.parametrize("name", [n for n in SPLITS if n != "1x4"])
def test_any_split_of_the_batch_reaches_the_same_weights(results_by_split, name):
    reference, other = results_by_split["1x4"][1], results_by_split[name][1]
    assert reference.keys() == other.keys()
    # Two AdamW steps of lr 1e-2 move each weight by up to ~2e-2; Adam's first steps divide by |g|, which
    # magnifies float noise where a gradient is near zero, so the bound is loose but far below a step.
    worst = max(float((reference[k] - other[k]).abs().max()) for k in reference)
    assert worst < 1e-3, f"{name}: max weight difference {worst:.2e}"
