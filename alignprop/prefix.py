"""The gradient-free prefix of a training update, run at a large batch (`train.no_grad_batch_size`).

Before a truncation plan's first kept step nothing requires grad (`alignprop.sampling`), so those steps need no
activations and can run at a much larger batch than `train.batch_size_per_gpu_available`, which is sized for the
steps with gradient. With `train.no_grad_batch_size` set, `Trainer.micro_batches` draws every micro-batch of an
update first, advances every sample through its own prefix here, and hands each micro-batch on at its first kept
step (`MicroBatch.start`); `sample` runs the rest, with gradient, on the same schedule.

- The prefix of a micro-batch is its plan's steps [0, first kept step) (all of them when no step keeps its
  gradient); per_step_uniform included: its plan is drawn as before, once per micro-batch.
- Grouping: the samples sorted by prefix length, longest first, so the ones still inside their prefix at step t are
  the first n_t of that order; step t advances them in consecutive chunks of at most `no_grad_batch_size`.
- Random streams: prompts, latents and plans are separate generators, and nothing else draws from them between the
  micro-batches of an update when eta = 0 (DDIM noise is the only other use of the latents stream; eta > 0 is
  refused by `check`), so drawing all micro-batches first leaves every stream's sequence, every plan and every
  checkpoint as before. Only the batch composition of the no-grad denoiser calls changes (float rounding).
- Every gradient path (`alignprop.paths`) says how many of its plan's leading steps run without gradient
  (`GradientPath.gradient_free_steps`) and continues from there; all of a path's draws happen when its micro-batch
  is drawn, so the streams stay as they were here too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignprop.conditioning import Conditioning
from alignprop.errors import UserError
from alignprop.sampling import SamplingOptions, guided_prediction


def check(config) -> None:
    """One UserError line for a `train.no_grad_batch_size` the run cannot honour exactly."""
    size = config.train.get("no_grad_batch_size", 0)
    if not size:
        return
    if config.eta != 0:
        raise UserError(
            f"train.no_grad_batch_size={size} needs eta=0 (DDIM noise with eta={config.eta:g} would be drawn in "
            "another order): set train.no_grad_batch_size=0 or eta=0"
        )


def prefix_length(keep_grad: Sequence[bool]) -> int:
    """Steps before the first one that keeps its gradient (all of them when none does)."""
    return next((step for step, keep in enumerate(keep_grad) if keep), len(keep_grad))


@torch.no_grad()
def run_prefixes(
    model,
    conditioning: Conditioning,
    latents: torch.Tensor,
    lengths: Sequence[int],
    options: SamplingOptions,
    chunk: int,
) -> torch.Tensor:
    """Advance sample i of `latents` through the first lengths[i] steps of the `options.steps`-step schedule,
    without gradient, at most `chunk` samples per denoiser call; returns every sample's latents at its own step."""
    assert options.eta == 0, "the no-grad prefix runs eta=0 only (`check` refuses the rest before the run)"
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep the drawing order
    index = torch.tensor(order, dtype=torch.long)
    current = latents[index.to(latents.device)]  # a copy, advanced in place
    conditioning = conditioning.rows(index)
    longest = [lengths[i] for i in order]
    timesteps = model.set_timesteps(options.steps, latents.device)
    for step in range(longest[0] if longest else 0):
        active = sum(length > step for length in longest)
        for first in range(0, active, chunk):
            part = slice(first, min(first + chunk, active))
            prediction = guided_prediction(model, current[part], timesteps[step], conditioning.rows(part), options)
            current[part] = model.step(prediction, timesteps[step], current[part], eta=0.0)
    advanced = torch.empty_like(current)
    advanced[index.to(current.device)] = current
    return advanced
