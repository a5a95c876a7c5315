import pytest
from ml_collections import ConfigDict

from alignprop.batching import fill_derived_fields, plan_batches
from alignprop.errors import UserError


def train_config(per_epoch=256, per_update=128, capacity=4):
    return ConfigDict(
        {
            "total_samples_per_epoch": per_epoch,
            "total_batch_size": per_update,
            "batch_size_per_gpu_available": capacity,
            "gradient_accumulation_steps": -1,
            "data_loader_iterations": -1,
        }
    )


@pytest.mark.parametrize("processes, accumulation, passes", [(1, 32, 64), (2, 16, 32), (4, 8, 16), (8, 4, 8)])
def test_seed_batch_math(processes, accumulation, passes):
    plan = plan_batches(train_config(), processes)
    assert (plan.gradient_accumulation_steps, plan.forward_passes_per_epoch) == (accumulation, passes)
    assert plan.updates_per_epoch == 2  # 256 samples per epoch, 128 per update, whatever N is
    # Samples per update over all processes are always the seed's 128.
    assert plan.batch_size * plan.gradient_accumulation_steps * processes == 128


def test_derived_fields_are_written_under_the_seed_names():
    train = train_config()
    fill_derived_fields(train, plan_batches(train, 4))
    assert (train.gradient_accumulation_steps, train.data_loader_iterations) == (8, 16)


@pytest.mark.parametrize(
    "config, processes, fragment",
    [
        (train_config(), 3, "divisible by the number of processes (3)"),
        (train_config(per_epoch=200), 1, "multiple of train.total_batch_size"),
        (train_config(capacity=3), 1, "multiple of train.batch_size_per_gpu_available=3"),
        (train_config(capacity=0), 1, "must be positive"),
        (train_config(), 64, "multiple of train.batch_size_per_gpu_available=4"),
    ],
)
def test_indivisible_sizes_are_clear_errors(config, processes, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        plan_batches(config, processes)
