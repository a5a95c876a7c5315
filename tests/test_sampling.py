"""The sampler against a naive transcription of the original loop, and the truncation plans."""

import statistics

import pytest
import torch
from gradient_checks import float64_model_with_lora, lora_grads, steps_receiving_gradient

from alignprop import models
from alignprop.errors import UserError
from alignprop.families import family_of
from alignprop.reference import reference_sample
from alignprop.sampling import SamplingOptions, decode, initial_latents, native_precision, sample
from alignprop.truncation import Truncation, truncation_from_config

STEPS = 10
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def model64():
    """The tiny model in float64 with a LoRA whose B factors are non-zero (so every factor gets grad)."""
    return float64_model_with_lora("tiny", LORA_TARGETS)


PLANS = {
    "fixed": Truncation("fixed", STEPS, cut=STEPS - 1),
    "per_step_uniform": Truncation("per_step_uniform", STEPS, minmax=(0, STEPS)),
    "uniform": Truncation("uniform", STEPS, minmax=(0, STEPS)),
    "gaussian": Truncation("gaussian", STEPS, gaussian_mean=6.0, gaussian_std=2.0),
    "full": Truncation("full", STEPS),
}


def nontrivial_plan(truncation, seed=0):
    """A drawn plan that keeps some steps and (unless full) detaches others."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(100):
        plan = truncation.draw(generator)
        if any(plan) and (truncation.strategy == "full" or not all(plan)):
            return plan
    raise AssertionError("no non-trivial plan drawn")


@pytest.mark.parametrize("strategy", sorted(PLANS))
def test_gradients_equal_naive_original_loop(model64, strategy):
    keep_grad = nontrivial_plan(PLANS[strategy])
    ours = lora_grads(model64, sample, keep_grad)
    naive = lora_grads(model64, reference_sample, keep_grad)
    total = torch.cat([g.flatten() for g in naive.values()])
    assert total.abs().max() > 0, "the reference produced no gradient: the test would prove nothing"
    for name in naive:
        error = (ours[name] - naive[name]).norm() / naive[name].norm().clamp_min(1e-30)
        assert error <= 1e-5, f"{strategy}: {name} relative error {error:.2e}"


def test_guidance_one_skips_the_unconditional_half_with_the_same_gradients(model64):
    """At guidance 1 our sampler makes one UNet call per step on the conditional half; the naive loop still
    makes both calls and forms uncond + 1 * (cond - uncond). Same gradients (float64)."""
    keep_grad = nontrivial_plan(PLANS["per_step_uniform"], seed=2)
    batches = []
    handle = model64.denoiser.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    try:
        ours = lora_grads(model64, sample, keep_grad, guidance=1.0, grad_checkpoint=False)
    finally:
        handle.remove()
    assert batches == [2] * STEPS  # the two prompts only, never [uncond; cond]
    naive = lora_grads(model64, reference_sample, keep_grad, guidance=1.0)
    for name in naive:
        error = (ours[name] - naive[name]).norm() / naive[name].norm().clamp_min(1e-30)
        assert error <= 1e-5, f"{name} relative error {error:.2e}"


def test_gradients_do_not_depend_on_checkpointing(model64):
    keep_grad = nontrivial_plan(PLANS["per_step_uniform"], seed=3)
    with_checkpoint = lora_grads(model64, sample, keep_grad, grad_checkpoint=True)
    without = lora_grads(model64, sample, keep_grad, grad_checkpoint=False)
    for name in with_checkpoint:
        torch.testing.assert_close(with_checkpoint[name], without[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_unet_gradient_reaches_exactly_the_planned_steps(model64, seed):
    keep_grad = nontrivial_plan(PLANS["per_step_uniform"], seed=seed)
    planned = {i for i, keep in enumerate(keep_grad) if keep}
    assert steps_receiving_gradient(model64, sample, keep_grad) == planned


def test_no_kept_step_means_no_gradient_and_no_error(model64):
    grads = lora_grads(model64, sample, (False,) * STEPS)
    assert all(g.abs().max() == 0 for g in grads.values())


def test_no_grad_sampling_matches_stock_diffusers_pipeline(tiny_dir):
    """Our sampler under no_grad reproduces StableDiffusionPipeline.__call__ (DDIM, CFG) on the same latents."""
    pipeline = models.load_pipeline(str(tiny_dir))
    model = family_of(pipeline)
    latents = initial_latents(2, model, torch.Generator().manual_seed(5))
    prompts = ["cat", "dog"]
    with torch.no_grad():
        final = sample(model, model.encode(prompts), latents, (False,) * STEPS, SamplingOptions(STEPS, 5.0))
        ours = decode(model, final)
    stock = pipeline(prompts, num_inference_steps=STEPS, guidance_scale=5.0, latents=latents, output_type="pt").images
    torch.testing.assert_close((ours + 1) / 2, stock, atol=2e-5, rtol=0)


# --- truncation plans --------------------------------------------------------------------------


def draw(truncation, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [truncation.draw(generator) for _ in range(count)]


def test_fixed_cut_49_keeps_only_the_last_step():
    plan = Truncation("fixed", 50, cut=49).draw(torch.Generator())
    assert plan == (False,) * 49 + (True,)


def test_per_step_uniform_matches_the_original_probabilities():
    # Step i keeps its gradient iff i >= r with r ~ U{0..50} drawn per step: P = (i + 1) / 51.
    plans = draw(Truncation("per_step_uniform", 50, minmax=(0, 50)), 4000)
    for i in (0, 10, 25, 49):
        frequency = statistics.mean(plan[i] for plan in plans)
        assert abs(frequency - (i + 1) / 51) < 0.025, (i, frequency)
    assert any(plan != tuple(sorted(plan)) for plan in plans), "kept steps should not always be contiguous"


def test_uniform_draws_one_contiguous_suffix_per_batch():
    plans = draw(Truncation("uniform", 50, minmax=(0, 50)), 2000)
    assert all(plan == tuple(sorted(plan)) for plan in plans)
    kept = [sum(plan) for plan in plans]
    assert set(kept) == set(range(51))
    assert abs(statistics.mean(kept) - 25) < 1.5


def test_gaussian_cut_stays_in_range():
    plans = draw(Truncation("gaussian", 50, gaussian_mean=42, gaussian_std=5), 2000)
    cuts = [plan.index(True) for plan in plans]
    assert min(cuts) >= 1 and max(cuts) <= 49
    assert abs(statistics.mean(cuts) - 41.5) < 0.6  # int() truncates the N(42, 5) draw


def test_full_keeps_every_step():
    assert Truncation("full", 7).draw(torch.Generator()) == (True,) * 7


@pytest.mark.parametrize(
    "kwargs",
    [
        {"strategy": "fixed", "cut": 51},
        {"strategy": "fixed", "cut": -1},
        {"strategy": "uniform", "minmax": (10, 5)},
        {"strategy": "per_step_uniform", "minmax": (0, 60)},
        {"strategy": "gaussian", "gaussian_mean": 500.0},
        {"strategy": "gaussian", "gaussian_std": 0.0},
        {"strategy": "nope"},
    ],
)
def test_bad_truncation_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        Truncation(steps=50, **kwargs)


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"truncated_backprop": False}, "full"),
        ({"truncated_backprop_rand": True}, "per_step_uniform"),
        ({"truncated_backprop_rand": False}, "fixed"),
        ({"truncation_strategy": "gaussian"}, "gaussian"),
    ],
)
def test_auto_strategy_follows_the_original_flags(preset, flags, expected):
    config = preset("aesthetic")
    config.truncation_strategy = "auto"
    config.update(flags)
    assert truncation_from_config(config).strategy == expected


# --- the switchable fast paths (benchmarks/) must not change what is computed ------------------------


def test_native_dtype_turns_autocast_off_only_inside():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with native_precision(True, torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
        with native_precision(False, torch.device("cpu")):
            assert torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
