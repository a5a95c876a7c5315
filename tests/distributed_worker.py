"""Run under torchrun by tests/test_distributed.py (not collected by pytest).

Trains the tiny preset for a few updates on *pinned* prompts and latents: sample k of update u is the same
whatever the process count and batch split, so every split must reach the same LoRA weights.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/distributed_worker.py \
        OUT_FILE CAPACITY TOTAL_BATCH UPDATES
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from alignprop.lora import save_lora  # noqa: E402
from alignprop.presets import load_preset  # noqa: E402
from alignprop.prompts import load_prompts  # noqa: E402
from alignprop.runtime import process_count, validate  # noqa: E402
from alignprop.sampling import initial_latents  # noqa: E402
from alignprop.train import MicroBatch, Trainer  # noqa: E402

PROMPTS = load_prompts("toyworld_train")[::7]  # 9 captions of the tiny preset's world


class PinnedTrainer(Trainer):
    """Draws sample i of the global stream at position (update, process, micro-batch, slot)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_batches_drawn = 0
        total = self.config.train.total_batch_size * 8
        self.all_latents = initial_latents(total, self.model, torch.Generator().manual_seed(7))

    def draw_micro_batch(self):
        batches, rank = self.batches, self.accelerator.process_index
        update, micro = divmod(self.micro_batches_drawn, batches.gradient_accumulation_steps)
        self.micro_batches_drawn += 1
        per_update = self.config.train.total_batch_size
        first = update * per_update + (rank * batches.gradient_accumulation_steps + micro) * batches.batch_size
        indices = range(first, first + batches.batch_size)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in indices]
        latents = self.all_latents[list(indices)].to(self.accelerator.device)
        return MicroBatch(prompts, latents, self.path.draw(self.random, self.model, latents))

    def synchronize_gradients(self):
        super().synchronize_gradients()
        if not hasattr(self, "first_gradients"):  # the averaged gradient of the first update
            self.first_gradients = {
                name: param.grad.detach().clone()
                for name, param in self.denoiser.named_parameters()
                if param.requires_grad
            }


def main(out_file: str, capacity: int, total_batch: int, updates: int) -> None:
    config = load_preset("tiny")
    config.truncation_strategy = "fixed"  # the same plan on every process
    config.trunc_backprop_timestep = config.steps - 3
    config.train.batch_size_per_gpu_available = capacity
    config.train.total_batch_size = total_batch
    config.train.total_samples_per_epoch = total_batch
    config.logdir = str(Path(out_file).parent / "logs")
    batches = validate(config, process_count())
    trainer = PinnedTrainer(config, batches, Path(out_file).parent)
    for _ in range(updates):
        trainer.train_update()
    if trainer.accelerator.is_main_process:
        save_lora(trainer.model, Path(out_file))
        save_file(trainer.first_gradients, str(Path(out_file) / "first_gradients.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
