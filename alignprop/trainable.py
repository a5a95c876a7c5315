"""What a run trains (`train.finetune`): a LoRA adapter on the denoiser ("lora", the paper's), or every weight of
the denoiser ("full", as FlowBP and SRPO train FLUX.1 and SD3.5). Text encoders, VAE and rewards stay frozen.

Both give the trainer the parameters the optimizer updates, in fp32 (master weights; the forward runs in the
mixed-precision dtype under autocast), and write them into a checkpoint directory (and its `ema/`) or the run's
final folder and read them back bit for bit:

    lora   checkpoint_N/pytorch_lora_weights.safetensors        final: RUN/lora/
    full   checkpoint_N/<unet | transformer>/ (save_pretrained)  final: RUN/<unet | transformer>/
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from alignprop.denoiser_files import check_denoiser_folder, load_denoiser_weights, save_denoiser
from alignprop.errors import UserError
from alignprop.lora import add_lora, save_lora
from alignprop.lora_files import check_matches_config, copy_into_adapter, read_lora

LORA_DIR = "lora"  # the final LoRA's folder in the run directory


class Trainable(ABC):
    """The trained weights of one run; `params` are what the optimizer, the gradient average and the EMA see."""

    mode: str

    def __init__(self, model):
        self.model = model

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The trained parameters, in the denoiser's order (after sharding: its sharded parameters)."""
        return [param for param in self.model.denoiser.parameters() if param.requires_grad]

    @abstractmethod
    def save(self, directory: Path, state: dict | None = None) -> None:
        """Write the weights into a checkpoint directory (or its `ema/`); `state`: the denoiser's state dict
        gathered from its shards (`sharding.gathered_state`), else the denoiser's own tensors."""

    @abstractmethod
    def restore(self, directory: Path) -> None:
        """Read back, bit for bit, what `save` wrote into `directory`."""

    @abstractmethod
    def final_dir(self, run_dir: Path) -> Path:
        """Where the run's final weights go."""

    @abstractmethod
    def export(self, run_dir: Path, state: dict | None = None) -> None:
        """Write the final weights into `final_dir(run_dir)` (`state` as for `save`)."""

    def names(self) -> list[str]:
        """The trainable parameters' names, in the optimizer's order (a checkpoint must match them)."""
        return [name for name, param in self.model.denoiser.named_parameters() if param.requires_grad]


class LoraAdapter(Trainable):
    mode = "lora"

    def __init__(self, model, lora_config):
        super().__init__(model)
        self.lora_config = lora_config
        add_lora(model.denoiser, lora_config.rank, lora_config.alpha, lora_config.target_modules)

    def save(self, directory: Path, state: dict | None = None) -> None:
        save_lora(self.model, directory, state)

    def restore(self, directory: Path) -> None:
        weights = read_lora(directory)
        check_matches_config(weights, self.lora_config)
        copy_into_adapter(self.model.denoiser, weights)

    def final_dir(self, run_dir: Path) -> Path:
        return run_dir / LORA_DIR

    def export(self, run_dir: Path, state: dict | None = None) -> None:
        save_lora(self.model, self.final_dir(run_dir), state)


class FullDenoiser(Trainable):
    mode = "full"

    def __init__(self, model):
        super().__init__(model)
        denoiser = model.denoiser.float()  # the fp32 master weights; autocast computes in the run's dtype
        denoiser.requires_grad_(True)
        self.class_name = type(denoiser).__name__  # before sharding makes it an FSDP subclass

    def folder(self, directory: Path) -> Path:
        return directory / self.model.denoiser_name

    def save(self, directory: Path, state: dict | None = None) -> None:
        save_denoiser(self.model.denoiser, self.folder(directory), self.class_name, state)

    def restore(self, directory: Path) -> None:
        load_denoiser_weights(self.model.denoiser, self.folder(directory))

    def final_dir(self, run_dir: Path) -> Path:
        return self.folder(run_dir)

    def export(self, run_dir: Path, state: dict | None = None) -> None:
        self.save(run_dir, state)


def trainable_from_config(config, model) -> Trainable:
    if config.train.get("finetune", "lora") == "full":
        return FullDenoiser(model)
    return LoraAdapter(model, config.lora)


def check_saved(directory: Path, saved_mode: str, config, denoiser_name: str | None) -> None:
    """Before the run directory exists: the checkpoint at `directory` was trained as this config trains, and its
    weights read (`denoiser_name`: the folder a full checkpoint keeps its denoiser in)."""
    mode = config.train.get("finetune", "lora")
    if saved_mode != mode:
        raise UserError(
            f"{str(directory)!r} was trained with train.finetune={saved_mode!r}, this config has {mode!r}; resume "
            "with the checkpoint's setting (evaluate it with the evaluate preset)"
        )
    if mode == "lora":
        check_matches_config(read_lora(directory), config.lora)
    else:
        check_denoiser_folder(directory / str(denoiser_name))
