"""Batch math: how the seed's per-epoch and per-update sample counts split over processes.

`total_samples_per_epoch` and `total_batch_size` (samples per optimizer update) are totals over all
processes; `batch_size_per_gpu_available` is what one process fits in one forward pass. With N processes:
per process and update, total_batch_size / N samples are accumulated over gradient_accumulation_steps
forward passes of batch_size_per_gpu_available each.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignprop.errors import UserError


@dataclass(frozen=True)
class BatchPlan:
    num_processes: int
    batch_size: int  # samples per forward pass per process
    gradient_accumulation_steps: int  # forward passes per optimizer update
    forward_passes_per_epoch: int  # per process (the seed's data_loader_iterations)

    @property
    def updates_per_epoch(self) -> int:
        return self.forward_passes_per_epoch // self.gradient_accumulation_steps


def _divide(numerator: int, denominator: int, what: str) -> int:
    if denominator <= 0 or numerator <= 0 or numerator % denominator:
        raise UserError(what)
    return numerator // denominator


def plan_batches(train, num_processes: int) -> BatchPlan:
    """Derive the per-process batch plan from the `train` config; one clear error when it doesn't divide."""
    per_epoch, per_update, capacity = (
        train.total_samples_per_epoch,
        train.total_batch_size,
        train.batch_size_per_gpu_available,
    )
    n = num_processes
    if capacity <= 0:
        raise UserError(f"train.batch_size_per_gpu_available must be positive, got {capacity}")
    _divide(
        per_epoch,
        per_update,
        f"train.total_samples_per_epoch={per_epoch} must be a positive multiple of "
        f"train.total_batch_size={per_update} (whole optimizer updates per epoch)",
    )
    update_per_process = _divide(
        per_update, n, f"train.total_batch_size={per_update} must be divisible by the number of processes ({n})"
    )
    accumulation = _divide(
        update_per_process,
        capacity,
        f"train.total_batch_size / processes = "
        f"{per_update}/{n} = {update_per_process} must be a multiple of "
        f"train.batch_size_per_gpu_available={capacity}",
    )
    passes = per_epoch // n // capacity
    return BatchPlan(n, capacity, accumulation, passes)


def fill_derived_fields(train, plan: BatchPlan) -> None:
    """Write the derived numbers into the config under the seed's names, so the saved config shows them."""
    train.gradient_accumulation_steps = plan.gradient_accumulation_steps
    train.data_loader_iterations = plan.forward_passes_per_epoch
