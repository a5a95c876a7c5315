"""train.ema_decay: the moving average of the LoRA (alignprop/ema.py) against a plain transcription of FlowBP's
update (ema <- ema + (1 - d)(w - ema) after each optimizer step), used by evaluation and the final LoRA, the raw
weights in checkpoints, and resumed bit for bit."""

import pytest
import torch
from checkpoint_runs import read_metrics, run, straight_and_resumed
from safetensors.torch import load_file
from small_runs import make_trainer, small_config

from alignprop import checkpoint
from alignprop.errors import UserError
from alignprop.lora_files import LORA_FILE_NAME
from alignprop.runtime import validate

DECAY = 0.7  # far from 1, so that the average differs visibly from the weights after a few updates


def test_the_average_is_flowbps_lerp_after_each_step(preset, tmp_path):
    trainer = make_trainer(small_config(preset, tmp_path, **{"train.ema_decay": DECAY}))
    expected = [p.detach().clone() for p in trainer.params]
    for _ in range(3):
        trainer.train_update()
        expected = [e + (1 - DECAY) * (p.detach() - e) for e, p in zip(expected, trainer.params)]
    shadow = trainer.average.average.shadow_params
    assert all(torch.allclose(s, e, rtol=1e-6, atol=1e-9) for s, e in zip(shadow, expected))
    raw = [p.detach().clone() for p in trainer.params]
    assert any(not torch.allclose(r, e) for r, e in zip(raw, expected)), "the average equals the weights"
    with trainer.averaged():
        assert all(torch.equal(p, s) for p, s in zip(trainer.params, shadow))
    assert all(torch.equal(p, r) for p, r in zip(trainer.params, raw))  # restored after the block


def ema_config(preset, logdir, **overrides):
    config = small_config(preset, logdir, save_freq=1, same_evaluation=True, **{"train.ema_decay": DECAY})
    config.update(overrides)
    return config


def test_final_lora_is_the_average_checkpoints_the_weights_and_resume_is_exact(preset, tmp_path):
    runs = straight_and_resumed(lambda *args, **overrides: ema_config(preset, *args, **overrides), tmp_path)
    straight, second = runs["straight"], runs["second"]
    for name in ("lora/" + LORA_FILE_NAME, "checkpoints/checkpoint_2/" + LORA_FILE_NAME):
        expected, got = load_file(straight / name), load_file(second / name)
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    final = load_file(straight / "lora" / LORA_FILE_NAME)
    raw = load_file(straight / "checkpoints/checkpoint_2" / LORA_FILE_NAME)
    assert final.keys() == raw.keys() and any(not torch.equal(final[k], raw[k]) for k in final)
    averaged = load_file(straight / "checkpoints/checkpoint_2" / checkpoint.AVERAGE_DIR / LORA_FILE_NAME)
    assert all(torch.equal(final[k], averaged[k]) for k in final)  # what evaluating the checkpoint scores
    state = torch.load(straight / "checkpoints/checkpoint_2" / checkpoint.STATE_FILE, weights_only=True)
    assert state["ema"]["decay"] == DECAY and state["ema"]["optimization_step"] == 4
    # The evaluations during training score the average: the last one equals evaluating the final LoRA.
    _, result = runs["evaluate"]
    last = [r for r in read_metrics(straight) if r.get("eval")][-1]
    assert result.summary()["reward_mean"] == pytest.approx(last["reward_mean"], abs=1e-6)


def test_resuming_a_run_without_an_average_starts_one(preset, tmp_path, capsys):
    first, _ = run(small_config(preset, tmp_path, run_name="plain", num_epochs=1, save_freq=1))
    run(ema_config(preset, tmp_path, run_name="averaged", num_epochs=2, resume_from=str(first)))
    assert "holds no moving average; it starts from the restored weights" in capsys.readouterr().out


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_a_decay_outside_zero_one_is_one_line(preset, tmp_path, value):
    config = small_config(preset, tmp_path, **{"train.ema_decay": value})
    with pytest.raises(UserError) as error:
        validate(config, num_processes=1)
    assert "train.ema_decay" in str(error.value) and "\n" not in str(error.value)
