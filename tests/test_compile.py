"""`compile_denoiser`: the denoiser's calls without gradient run through torch.compile (CPU inductor here).

One compiled model serves every check (compiling the tiny UNet takes tens of seconds on 2 cores): the
compiled calls happen, the LoRA gradients still equal the naive loop's in float64, and an in-place update
of the LoRA weights (what the optimizer does) is seen by the compiled graph without recompiling.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from alignprop.reference import reference_sample
from alignprop.sampling import sample
from tests.gradient_checks import float64_model_with_lora, lora_grads, lora_params, relative_errors

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PLAN = (False, True, False, False)  # a detached step before and two after the kept one: all compiled


@pytest.fixture(scope="module")
def compiled_model():
    torch._dynamo.reset()
    model = float64_model_with_lora("tiny", LORA_TARGETS)
    model.compile_denoiser("default")
    return model


def test_calls_without_gradient_run_compiled_and_gradients_equal_the_naive_loop(compiled_model):
    frames_before = counters["frames"]["ok"]
    ours = lora_grads(compiled_model, sample, PLAN)
    assert counters["frames"]["ok"] > frames_before  # the compiled denoiser really ran
    naive = lora_grads(compiled_model, reference_sample, PLAN)
    errors = relative_errors(ours, naive)
    assert max(errors.values()) < 1e-5, errors


def test_an_in_place_lora_update_reaches_the_compiled_graph(compiled_model):
    lora_grads(compiled_model, sample, PLAN)  # compiled (again) before the update
    with torch.no_grad():
        for name, param in lora_params(compiled_model.denoiser).items():
            if "lora_B" in name:
                param.mul_(-2.0)  # what an optimizer step does: same tensor, new values
    ours = lora_grads(compiled_model, sample, PLAN)
    naive = lora_grads(compiled_model, reference_sample, PLAN)
    errors = relative_errors(ours, naive)
    assert max(errors.values()) < 1e-5, errors


def test_a_training_run_with_compile_denoiser_learns_what_the_eager_run_learns(preset, tmp_path):
    """Through the job (session, trainer, evaluation): the compiled no-grad calls give the eager run's LoRA."""
    from safetensors.torch import load_file
    from small_runs import small_config

    from alignprop.jobs import run_job
    from alignprop.lora_files import LORA_FILE_NAME

    def lora(name, **overrides):
        _, run_dir, _ = run_job(small_config(preset, tmp_path, run_name=name, num_epochs=1, **overrides))
        return load_file(run_dir / "lora" / LORA_FILE_NAME)

    frames_before = counters["frames"]["ok"]
    compiled = lora("compiled", compile_denoiser="default", truncation_strategy="fixed")
    assert counters["frames"]["ok"] > frames_before
    eager = lora("eager", truncation_strategy="fixed")
    assert compiled.keys() == eager.keys()
    # float32, and Adam's normalised steps amplify rounding in near-zero gradients: compare each tensor as a whole
    errors = {key: float((compiled[key] - eager[key]).norm() / eager[key].norm()) for key in eager}
    assert max(errors.values()) < 1e-3, errors
