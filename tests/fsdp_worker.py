"""Run under torchrun by tests/test_sharding.py (not collected by pytest).

Trains pinned samples (tests/distributed_worker.py's `PinnedTrainer`: sample k of update u is the same whatever the
process count) on each CASE (`model:finetune`) with `sharding` SHARDING, and writes under OUT_DIR/<model>_<finetune>/:

    weights.safetensors           every trained tensor after UPDATES updates, whole (gathered from the shards)
    first_gradients.safetensors   the first update's averaged gradient, whole
    local_<rank>.json             this process's element counts: trained parameters, AdamW state, and the totals

    python -m torch.distributed.run --standalone --nproc_per_node N tests/fsdp_worker.py \
        OUT_DIR SHARDING UPDATES CASE...

SHARDING is `none`, `fsdp`, `fsdp+save` (fsdp, and a checkpoint after the first update, in <case>/checkpoints) or
`resume:<none|fsdp>:<DIR>`: resume DIR/<case>'s newest checkpoint with that sharding and train UPDATES more updates
of the same pinned samples.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from distributed_worker import PinnedTrainer  # noqa: E402

from alignprop.presets import load_preset  # noqa: E402
from alignprop.runtime import process_count, validate  # noqa: E402
from alignprop.sharding import gathered, local  # noqa: E402
from alignprop.train import Trainer  # noqa: E402


def whole(trainer, tensor_of) -> dict:
    """`tensor_of(param)` of every trained parameter by name, whole (every process gathers together)."""
    named = trainer.denoiser.named_parameters()
    return {name: gathered(tensor_of(param)).contiguous().clone() for name, param in named if param.requires_grad}


class ShardedPinnedTrainer(PinnedTrainer):
    def synchronize_gradients(self):
        Trainer.synchronize_gradients(self)
        if not hasattr(self, "first_gradients"):  # whole on every process: gathered together
            self.first_gradients = whole(self, lambda param: param.grad)


def case_config(model: str, finetune: str, sharding: str, out: Path):
    config = load_preset("tiny")
    config.pretrained.model = model
    if model != "toyworld":  # the toy world's reward reads its 32 x 32 images only
        config.reward_fn = "compressibility"
    config.steps = 4
    config.truncated_backprop_minmax = (0, 4)
    config.truncation_strategy = "fixed"  # the same plan on every process, sharded or not
    config.trunc_backprop_timestep = 2  # steps 2 and 3 keep their gradient
    config.train.update(finetune=finetune, learning_rate=1e-4, batch_size_per_gpu_available=1)
    # Adam's first steps divide by |g|: an epsilon above the float noise of near-zero gradients keeps two runs that
    # sum their gradients in another order comparable to 1e-5 (with 1e-8 they differ by up to 3% of a step there).
    config.train.adam_epsilon = 1e-3
    config.train.update(total_batch_size=2, total_samples_per_epoch=8)
    config.sharding = sharding
    config.save_freq = 1
    config.logdir = str(out / "logs")
    return config


def run_case(out: Path, model: str, finetune: str, mode: str, updates: int) -> None:
    resume = mode.split(":", 2) if mode.startswith("resume:") else None
    sharding = resume[1] if resume else mode.removesuffix("+save")
    config = case_config(model, finetune, sharding, out)
    if resume:
        config.resume_from = str(Path(resume[2]) / out.name)
    trainer = ShardedPinnedTrainer(config, validate(config, process_count()), out)
    trainer.micro_batches_drawn = trainer.update * trainer.batches.gradient_accumulation_steps  # pinned from here
    for update in range(updates):
        trainer.train_update()
        if mode.endswith("+save") and update == 0:
            trainer.save_checkpoint()
    weights = whole(trainer, lambda param: param)
    rank = trainer.accelerator.process_index
    optimizer = [local(t) for state in trainer.optimizer.state_dict()["state"].values() for t in state.values()]
    counts = {
        "params": sum(local(param).numel() for param in trainer.params),
        "optimizer": sum(t.numel() for t in optimizer if t.dim() > 0),
        "total_params": sum(tensor.numel() for tensor in weights.values()),
    }
    (out / f"local_{rank}.json").write_text(json.dumps(counts))
    if trainer.accelerator.is_main_process:
        save_file(weights, str(out / "weights.safetensors"))
        save_file(trainer.first_gradients, str(out / "first_gradients.safetensors"))
    trainer.accelerator.wait_for_everyone()


def main(out_dir: str, mode: str, updates: int, cases: list[str]) -> None:
    for case in cases:
        model, finetune = case.split(":")
        out = Path(out_dir) / f"{model}_{finetune}"
        out.mkdir(parents=True, exist_ok=True)
        run_case(out, model, finetune, mode, updates)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
