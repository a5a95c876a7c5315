"""train.no_grad_batch_size: the gradient-free prefix of an update's samples in large no-grad batches (issue 18).

With it on, an update draws all its micro-batches first, runs every sample's steps before its plan's first kept
step without gradient in chunks, then each micro-batch's remaining steps with gradient. In float64 the LoRA
gradients of one update equal those of the micro-batch-by-micro-batch path for every truncation strategy and every
gradient path, the
plans and the random streams' states after the update are the same, and so are checkpoints.
"""

import pytest
import torch
from safetensors.torch import load_file
from small_runs import make_trainer, one_update_runner, small_config

from alignprop import checkpoint, models, paths, prefix
from alignprop.conditioning import Conditioning
from alignprop.errors import UserError
from alignprop.prefix import prefix_length, run_prefixes
from alignprop.runtime import validate
from alignprop.sampling import SamplingOptions, initial_latents, sample
from alignprop.truncation import Truncation

STEPS = 6
# 3 micro-batches of 2 samples per update: chunks of 4 (or 5, 1, 7) do not divide the 6 samples evenly.
BATCHES = {
    "train.total_samples_per_epoch": 6,
    "train.total_batch_size": 6,
    "train.batch_size_per_gpu_available": 2,
}
TRUNCATIONS = {
    "fixed": Truncation("fixed", STEPS, cut=STEPS - 1),  # K=1: a 5-step prefix
    "per_step_uniform": Truncation("per_step_uniform", STEPS, minmax=(0, STEPS)),
    "uniform": Truncation("uniform", STEPS, minmax=(0, STEPS)),
    "gaussian": Truncation("gaussian", STEPS, gaussian_mean=3.0, gaussian_std=1.5),
    "full": Truncation("full", STEPS),
}


def config_for(preset, tmp_path, steps=STEPS, **overrides):
    """The small tiny-preset run (per_step_uniform over all steps), guided, 3 micro-batches of 2 per update."""
    limits = {"truncated_backprop_minmax": (0, steps), "trunc_backprop_timestep": steps - 1}
    return small_config(preset, tmp_path, steps=steps, sd_guidance_scale=3.0, **limits, **BATCHES, **overrides)


@pytest.fixture(scope="module")
def trainer64(preset, tmp_path_factory):
    """`gradients(strategy, chunk)`: one update of a float64 trainer from the same weights and stream states with a
    truncation strategy or another gradient path; (LoRA gradients, kept steps, stream states after)."""
    trainer, run = one_update_runner(config_for(preset, tmp_path_factory.mktemp("prefix")))

    def gradients(strategy: str, chunk: int):
        if strategy in TRUNCATIONS:
            path = paths.Truncation(trainer.config)
            path.strategy = TRUNCATIONS[strategy]
        else:  # another gradient path, with its default settings for a STEPS-step schedule
            path = paths.REGISTRY[strategy](replace_path(trainer.config, strategy))
        grads, record, streams = run(path, chunk)
        return grads, record["kept_steps"], streams

    return gradients


def replace_path(config, name):
    config = config.copy_and_resolve_references()
    config.gradient_path = name
    config.gradient_paths.refl.last_steps = (1, 3)
    config.gradient_paths.drtune.train_steps = 2
    return config


def same_streams(a: dict, b: dict) -> bool:
    return (
        a["prompts"] == b["prompts"] and torch.equal(a["latents"], b["latents"]) and torch.equal(a["plans"], b["plans"])
    )


@pytest.mark.parametrize(
    "strategy, chunk",
    [
        ("fixed", 4),
        ("per_step_uniform", 4),
        ("per_step_uniform", 1),
        ("uniform", 5),
        ("gaussian", 7),
        ("full", 4),
        *((name, 4) for name in paths.NAMES if name != "truncation" and not name.startswith("flowbp")),
    ],
)
def test_one_update_has_the_same_gradients_plans_and_streams(trainer64, strategy, chunk):
    off_grads, off_kept, off_streams = trainer64(strategy, 0)
    on_grads, on_kept, on_streams = trainer64(strategy, chunk)
    assert on_kept == off_kept and len(on_kept) == 3
    assert same_streams(on_streams, off_streams)
    assert any(g.abs().sum() > 0 for g in off_grads) or not any(off_kept)
    for on, off in zip(on_grads, off_grads):
        assert (on - off).norm() <= 1e-5 * off.norm() + 1e-12


def test_prefixes_are_grouped_by_length_and_chunked(monkeypatch):
    """The samples still in their prefix at step t are advanced together, at most `chunk` per call."""

    class Recorder:  # stands in for a model family: records the batch of every denoiser call
        def __init__(self):
            self.calls = []

        def set_timesteps(self, steps, device):
            return torch.arange(steps, 0, -1)

        def guided(self, options):
            return False

        def step(self, prediction, timestep, latents, eta=0.0, generator=None):
            return latents + 1

    model = Recorder()

    def prediction(model_, latents, timestep, conditioning, options):
        model.calls.append((int(timestep), conditioning.cond["ids"].tolist()))
        return torch.zeros_like(latents)

    monkeypatch.setattr(prefix, "guided_prediction", prediction)
    conditioning = Conditioning({"ids": torch.arange(5)}, batch_size=5)
    lengths = [2, 0, 3, 3, 1]
    out = run_prefixes(model, conditioning, torch.zeros(5, 1), lengths, SamplingOptions(4, 1.0), chunk=2)
    assert out.flatten().tolist() == lengths  # each sample advanced by its own prefix
    assert model.calls == [(4, [2, 3]), (4, [0, 4]), (3, [2, 3]), (3, [0]), (2, [2, 3])]
    assert prefix_length((False, False, True, False)) == 2 and prefix_length((False,) * 3) == 3
    assert conditioning.rows(slice(1, 3)).cond["ids"].tolist() == [1, 2] and len(conditioning.rows(slice(1, 3))) == 2


def test_sample_from_a_start_step_continues_the_same_schedule():
    """`sample(..., start=k)` from the latents at step k ends where the whole chain ends (tiny SDXL: nested
    conditioning through `Conditioning.rows`)."""
    model = models.load_model("tiny_sdxl")
    options = SamplingOptions(STEPS, 3.0)
    prompts = ["cat", "a red dog", "bird"]
    latents = initial_latents(3, model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        conditioning = model.encode(prompts)
        whole = sample(model, conditioning, latents, (False,) * STEPS, options)
        lengths = [4, 1, 6]
        advanced = run_prefixes(model, conditioning, latents, lengths, options, chunk=2)
        for i, length in enumerate(lengths):
            one = conditioning.rows(slice(i, i + 1))
            final = sample(model, one, advanced[i : i + 1], (False,) * STEPS, options, start=length)
            torch.testing.assert_close(final, whole[i : i + 1], rtol=1e-5, atol=1e-5)


def test_checkpoints_are_the_same_with_the_prefix_on(preset, tmp_path):
    """Two updates then a checkpoint: the same random states; the LoRA equal to float32 rounding."""
    saved = {}
    for chunk in (0, 3):
        config = config_for(preset, tmp_path, run_name=f"chunk{chunk}", num_epochs=1, save_freq=1, steps=4)
        config.train.total_batch_size = 4  # 2 micro-batches of 2 per update, 2 updates
        config.train.total_samples_per_epoch = 8
        config.train.no_grad_batch_size = chunk
        # With epsilon 1e-8 AdamW divides a near-zero gradient by its own magnitude, turning the float32 rounding of a
        # differently batched prefix into up to 7 % of a step on a few elements (seen: 6.8e-5 at lr 1e-3); 1e-3 keeps
        # the update proportional to the gradient, so the comparison measures the prefix, not that division.
        config.train.adam_epsilon = 1e-3
        trainer = make_trainer(config)
        trainer.fit()
        (last,) = checkpoint.complete_checkpoints(trainer.run_dir / "checkpoints")
        saved[chunk] = (last.training_state(), load_file(last.lora_path), last.info["update"])
    (state_off, lora_off, update_off), (state_on, lora_on, update_on) = saved[0], saved[3]
    assert update_off == update_on == 2
    assert same_streams(state_on["random"][0]["streams"], state_off["random"][0]["streams"])
    global_on, global_off = state_on["random"][0]["global"], state_off["random"][0]["global"]
    assert global_on["python"] == global_off["python"] and torch.equal(global_on["torch"], global_off["torch"])
    assert lora_on.keys() == lora_off.keys()
    for name in lora_off:
        torch.testing.assert_close(lora_on[name], lora_off[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.no_grad_batch_size": -1}, "train.no_grad_batch_size must be an integer in [0, "),
        ({"train.no_grad_batch_size": 2.5}, "train.no_grad_batch_size must be an integer in [0, "),
        ({"train.no_grad_batch_size": True}, "train.no_grad_batch_size must be an integer in [0, "),
        ({"train.no_grad_batch_size": 4, "eta": 0.5}, "train.no_grad_batch_size=4 needs eta=0"),
    ],
)
def test_bad_values_are_one_clear_line(preset, tmp_path, overrides, message):
    config = config_for(preset, tmp_path)
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        with node.ignore_type():  # as a Python caller could
            node[last] = value
    with pytest.raises(UserError) as error:
        validate(config, num_processes=1)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_off_by_default_and_accepted_with_eta_zero(preset, tmp_path):
    config = config_for(preset, tmp_path)
    assert config.train.no_grad_batch_size == 0
    config.train.no_grad_batch_size = 5
    validate(config, num_processes=1)
