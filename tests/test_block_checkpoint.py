"""`block_checkpoint` (diffusers' per-block gradient checkpointing) changes memory, never the gradients."""

import pytest
import torch.utils.checkpoint
from gradient_checks import float64_model_with_lora, lora_grads, relative_errors

from alignprop.reference import reference_sample
from alignprop.sampling import sample

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.mark.parametrize("name", ["tiny", "tiny_sd3"])
def test_block_checkpointed_gradients_equal_the_naive_loop(name, monkeypatch):
    model = float64_model_with_lora(name, TARGETS)
    keep_grad = (False, True, False, False, True, False)
    naive = lora_grads(model, reference_sample, keep_grad)
    calls, checkpoint = [], torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    model.denoiser.enable_gradient_checkpointing()  # what block_checkpoint=True does (session.build_session)
    ours = lora_grads(model, sample, keep_grad, grad_checkpoint=False)  # so every checkpoint call is a block's
    assert calls, "no block was checkpointed"
    assert max(g.abs().max() for g in naive.values()) > 0
    for key, error in relative_errors(ours, naive).items():
        assert error <= 1e-5, f"{key} relative error {error:.2e}"
