"""The training loop on the tiny preset: it learns, touches only LoRA, and is reproducible."""

import pytest
import torch
from checkpoint_runs import demo_run, read_metrics

from alignprop.batching import plan_batches
from alignprop.rundir import create_run_dir
from alignprop.runtime import validate
from alignprop.train import Trainer


def tiny(preset, tmp_path, **overrides):
    config = preset("tiny")
    config.logdir = str(tmp_path / "logs")
    config.update(overrides)
    return config


def make_trainer(config):
    batches = validate(config, num_processes=1)
    return Trainer(config, batches, create_run_dir(config.logdir, config.run_name))


@pytest.fixture(scope="module")
def demo(preset, tmp_path_factory):
    """The tiny preset exactly as the CPU demo runs it: (config, run_dir, (before, after))."""
    return demo_run(preset, tmp_path_factory)


def test_tiny_preset_raises_its_reward_and_the_checkers_accuracy(demo):
    before, after = (evaluation.summary() for evaluation in demo[2])
    # Measured on the 30 held-out captions (colour-shape pairs never fine-tuned on), one image each:
    # learned shape reward 0.814 -> 0.906, checker shape accuracy 0.900 -> 0.967 (27 -> 29 images right).
    assert after["reward_mean"] - before["reward_mean"] > 0.05
    assert after["checker_shape_mean"] > before["checker_shape_mean"]
    assert after["checker_background_mean"] == after["checker_colour_mean"] == 1.0  # nothing else was broken


def test_training_rewards_trend_upwards(demo):
    records = [r for r in read_metrics(demo[1]) if "loss" in r]  # training updates only
    first, last = records[: len(records) // 3], records[-len(records) // 3 :]
    mean = lambda rs: sum(r["reward_mean"] for r in rs) / len(rs)
    assert mean(last) > mean(first)


def test_demo_writes_its_outputs(demo):
    config, run_dir, _ = demo
    updates = config.num_epochs * plan_batches(config.train, 1).updates_per_epoch
    records = read_metrics(run_dir)
    evaluations = [r["update"] for r in records if r.get("eval")]
    assert config.vis_freq == 0 and evaluations == [0, updates]  # before and after training only
    assert len(records) == updates + len(evaluations) + 1  # + the final LoRA fingerprint
    assert len(records[-1]["weights_sha256_per_process"]) == 1
    update_record = records[1]
    for key in ("reward_mean", "reward_std", "loss", "grad_norm", "lr", "kept_steps", "seconds", "checker_shape_mean"):
        assert key in update_record, key
    assert len(update_record["kept_steps"]) == config.train.gradient_accumulation_steps
    assert (run_dir / "before_after.png").stat().st_size > 0
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (run_dir / "checkpoints" / f"checkpoint_{config.num_epochs}").is_dir()


def frozen_weights(trainer) -> dict:
    """Every non-LoRA tensor of the UNet, VAE and text encoder."""
    pipeline = trainer.model.pipeline
    modules = {"unet": trainer.denoiser, "vae": pipeline.vae, "text": pipeline.text_encoder}
    return {
        f"{prefix}.{name}": tensor.clone()
        for prefix, module in modules.items()
        for name, tensor in module.state_dict().items()
        if "lora_" not in name
    }


def test_only_lora_changes_in_an_update(preset, tmp_path):
    trainer = make_trainer(tiny(preset, tmp_path))
    frozen = frozen_weights(trainer)
    lora_before = {n: p.detach().clone() for n, p in trainer.denoiser.named_parameters() if p.requires_grad}
    trainer.train_update()
    trainer.train_update()  # the second update moves lora_A too (B starts at zero)
    now = frozen_weights(trainer)
    assert all(torch.equal(frozen[k], now[k]) for k in frozen), "a frozen weight changed"
    assert all("lora_" in n for n in lora_before)
    params = trainer.denoiser.named_parameters()
    changed = [n for n, p in params if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert len(changed) == len(lora_before), "every LoRA tensor should have moved"
    assert all(not p.requires_grad for p in trainer.reward.parameters())


def test_same_seed_same_run(preset, tmp_path):
    runs = []
    for name in ("a", "b"):
        config = tiny(preset, tmp_path, run_name=name, num_epochs=1)
        trainer = make_trainer(config)
        records = [trainer.train_update() for _ in range(2)]
        runs.append(([r["reward_mean"] for r in records], [r["kept_steps"] for r in records]))
        weights = [p.detach().clone() for p in trainer.params]
        runs[-1] += (weights,)
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))
