"""Checkpoints: save (atomically), find, rotate, and read back for resuming.

`logs/RUN/checkpoints/checkpoint_N/` holds the state after N completed epochs (resuming starts epoch N+1);
`checkpoint_N_update_U/` is one saved by Ctrl-C inside epoch N+1, after update U (resuming continues there):

    pytorch_lora_weights.safetensors   the LoRA in diffusers format (loads with `load_lora_weights(dir)`)
    unet/ or transformer/              instead, with train.finetune="full": the whole denoiser (save_pretrained)
    ema/                               the moving average's weights, laid out the same (train.ema_decay)
    sharded/                           with sharding=fsdp: AdamW's state and the moving average's tensors as each
                                       process held them (torch.distributed.checkpoint; any process count reads them)
    training_state.pt                  optimizer, grad scaler, every RNG stream, counters: tensors and plain
                                       containers only, read back with torch.load(weights_only=True)
    checkpoint.json                    written last; a directory without it is never used

A save is written into a hidden temporary directory beside the others, fsynced, and renamed into place,
so a save that dies half-way leaves nothing that looks like a checkpoint; one that fails (a full disk) removes
its temporary directory and raises `SaveError`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from alignprop.denoiser_files import is_denoiser_folder
from alignprop.errors import UserError
from alignprop.lora_files import LORA_FILE_NAME, is_original_checkpoint, lora_file
from alignprop.nonfinite import all_finite, optimizer_tensors
from alignprop.pause import pause_point
from alignprop.rundir import os_error_behind
from alignprop.written_files import give_normal_mode

# resume_from(_2) values meaning "the base model, no trained weights": "base" (any family), and the original code's
# "stablediffusion" (kept working). A directory of either name is given as ./base.
BASE_MODEL = "base"
BASE_MODEL_NAMES = (BASE_MODEL, "stablediffusion")
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "training_state.pt"
MARKER_FILE = "checkpoint.json"
TEMP_PREFIX = ".tmp-"
AVERAGE_DIR = "ema"  # a checkpoint's moving-average weights (train.ema_decay), beside its raw ones
SHARDED_DIR = "sharded"  # sharding=fsdp: the optimizer's and the average's tensors, one file per process (DCP)
FORMAT_VERSION = 1
NAME_PATTERN = re.compile(r"checkpoint_(\d+)(?:_update_(\d+))?")


def is_base_model(source: str) -> bool:
    """Whether a resume_from(_2) value names the base model (BASE_MODEL_NAMES) rather than trained weights."""
    return source in BASE_MODEL_NAMES


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    info: dict  # the contents of checkpoint.json

    @property
    def epoch(self) -> int:
        return self.info["epoch"]

    @property
    def order(self) -> tuple[int, int]:
        return self.epoch, self.info.get("update", 0)

    @property
    def lora_path(self) -> Path:
        return self.path / LORA_FILE_NAME

    @property
    def finetune(self) -> str:
        """What the run trained (`train.finetune`); checkpoints from before full fine-tuning hold a LoRA."""
        return self.info.get("finetune", "lora")

    @property
    def denoiser_name(self) -> str | None:
        """The folder (`unet` / `transformer`) of a full fine-tuning checkpoint's denoiser."""
        return self.info.get("denoiser")

    @property
    def sharded_state(self) -> Path | None:
        """The DCP directory of a sharding=fsdp checkpoint (its optimizer state and average), else None."""
        return self.path / SHARDED_DIR if (self.path / SHARDED_DIR).is_dir() else None

    def weights_path(self, averaged: bool = False) -> Path:
        """Its LoRA file or denoiser folder (`averaged`: the moving average's, when it holds one)."""
        root = self.path / AVERAGE_DIR if averaged else self.path
        return root / self.denoiser_name if self.finetune == "full" else root / LORA_FILE_NAME

    def training_state(self) -> dict:
        """Optimizer, scaler, RNG and counters; plain data only (no pickled code is ever executed)."""
        try:
            return torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if "Weights only load failed" in reason:  # weights_only refuses anything that runs code on load
                reason = "it needs arbitrary code to unpickle (refused: only tensors and plain containers load)"
            raise UserError(f"cannot read the training state of {str(self.path)!r}: {reason}") from None


# --- the save schedule ------------------------------------------------------------------------------


def save_due(config, epoch: int) -> bool:
    """Whether training saves checkpoint_<epoch> after `epoch` completed epochs: every `save_freq`-th and the last
    (save_freq 0: none). The one rule the training loop and the start-up line both read.

    save_schedule="original": the original code's, which saved after the epoch of 0-based index e when
    e % save_freq == 0 (mihirp1998/AlignProp @ 7f4503f, main.py, line 601): after 1, 1 + save_freq, ... completed
    epochs, the last only when it falls on one (hps: 1, 5, ..., 197 of 200)."""
    save_freq = config.save_freq
    if save_freq <= 0:
        return False
    if config.get("save_schedule", "periodic") == "original":
        return (epoch - 1) % save_freq == 0
    return epoch % save_freq == 0 or epoch == config.num_epochs


def saved_epochs(config, first_epoch: int = 0) -> list[int]:
    """The completed-epoch counts after which a run starting after `first_epoch` epochs saves a checkpoint."""
    return [epoch for epoch in range(first_epoch + 1, config.num_epochs + 1) if save_due(config, epoch)]


def describe_schedule(config, first_epoch: int = 0) -> str:
    """What the start-up line says will be saved, e.g. "after epoch 4, 8, ..., 200 (50 checkpoint(s); the newest 10
    kept)"."""
    epochs = saved_epochs(config, first_epoch)
    if not epochs:
        return "none (save_freq=0)" if config.save_freq <= 0 else "none in the epochs this run trains (save_schedule)"
    shown = [str(epoch) for epoch in epochs]
    if len(shown) > 4:
        shown = [*shown[:2], "...", shown[-1]]
    kept = config.num_checkpoint_limit
    keeps = f"; the newest {kept} kept" if len(epochs) > kept else ""
    return f"after epoch {', '.join(shown)} ({len(epochs)} checkpoint(s){keeps})"


def checkpoint_name(epoch: int, mid_epoch_update: int | None = None) -> str:
    return f"checkpoint_{epoch}" if mid_epoch_update is None else f"checkpoint_{epoch}_update_{mid_epoch_update}"


def read_complete(path: Path) -> Checkpoint | None:
    """The checkpoint at `path` if its marker and every file it lists are there, else None."""
    try:
        info = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    files = info.get("files") if isinstance(info, dict) else None
    if (
        not isinstance(files, list)
        or not isinstance(info.get("epoch"), int)
        or not all(isinstance(n, str) and (path / n).is_file() for n in files)
    ):
        return None
    return Checkpoint(path, info)


def complete_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete `checkpoint_N` directories under `root`, oldest first (temporary and unmarked ones skipped)."""
    if not root.is_dir():
        return []
    found = [read_complete(p) for p in root.iterdir() if p.is_dir() and NAME_PATTERN.fullmatch(p.name)]
    return sorted((c for c in found if c is not None), key=lambda c: c.order)


def looks_like_checkpoint(path: Path) -> bool:
    return bool(NAME_PATTERN.fullmatch(path.name)) or path.name.startswith(TEMP_PREFIX)


def resolve(resume_from: str) -> Checkpoint:
    """`resume_from` as a checkpoint: a checkpoint directory, or a run (or its checkpoints/) -> the newest."""
    path = Path(resume_from)
    if not path.exists():
        raise UserError(f"resume_from={resume_from!r} does not exist")
    if looks_like_checkpoint(path):
        checkpoint = read_complete(path)
        if checkpoint is None:
            raise UserError(
                f"resume_from={resume_from!r} is an incomplete checkpoint (no {MARKER_FILE} or missing files; "
                "the save was interrupted); use an earlier checkpoint or the run directory"
            )
        return checkpoint
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    checkpoints = complete_checkpoints(root)
    if not checkpoints:
        raise UserError(f"resume_from={resume_from!r} holds no complete checkpoint (looked for {root}/checkpoint_N)")
    return checkpoints[-1]


def resolve_weights(source: str) -> Path:
    """Trained weights to evaluate: a checkpoint or run (as `resolve`; its moving average when it holds one), a
    LoRA directory, a .safetensors file, a checkpoint directory of the original AlignProp code (its
    `pytorch_lora_weights.bin`), or a saved denoiser folder (`RUN/unet`, `RUN/transformer`). Returns a LoRA file
    or a denoiser folder (`denoiser_files.is_denoiser_folder`)."""
    path = Path(source)
    if is_original_checkpoint(path):
        return lora_file(path)
    if is_denoiser_folder(path):
        return path
    if path.is_file() or (path.is_dir() and (path / LORA_FILE_NAME).is_file() and not looks_like_checkpoint(path)):
        return path if path.is_file() else path / LORA_FILE_NAME
    return evaluated_weights(resolve(source))


def evaluated_weights(saved: Checkpoint) -> Path:
    """The weights of `saved` an evaluation uses: its moving average when it holds one (train.ema_decay)."""
    averaged = saved.weights_path(averaged=True)
    return averaged if averaged.exists() else saved.weights_path()


# --- writing ----------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class SaveError(OSError):
    """A checkpoint could not be written (`filename`: the checkpoint directory); nothing of it was left behind."""


def write_training_state(directory: Path, state: dict) -> None:
    """Serialized in memory first: torch.save's own file writer reports a full disk as an opaque RuntimeError."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (directory / STATE_FILE).write_bytes(buffer.getbuffer())


def final_path(root: Path, epoch: int, update: int, mid_epoch: bool = False) -> Path:
    """checkpoint_<epoch>, or an interrupt's checkpoint_<epoch>_update_<update> (`mid_epoch`)."""
    return root / checkpoint_name(epoch, update if mid_epoch else None)


def staging_dir(final: Path) -> Path:
    """A new hidden temporary directory beside `final` to write its contents into (never read as a checkpoint)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}-", dir=final.parent))


def save(
    root: Path,
    epoch: int,
    info: dict,
    write_contents: Callable[[Path], None],
    mid_epoch: bool = False,
    staging: Path | None = None,
) -> Path:
    """Write checkpoint_<epoch> under `root` atomically: `write_contents(tmp_dir)` fills it, then we mark,
    fsync and rename. A crash at any point leaves either the previous state or the complete checkpoint.
    `mid_epoch`: an interrupt's checkpoint, named checkpoint_<epoch>_update_<info["update"]>. `staging`: a
    `staging_dir` other processes have already written into (sharding=fsdp), else a new one."""
    final = final_path(root, epoch, info["update"], mid_epoch)
    try:
        _write_atomically(final, {"format": FORMAT_VERSION, "epoch": epoch, **info}, write_contents, staging)
    except Exception as error:
        problem = os_error_behind(error)  # a full disk, a read-only or unwritable directory
        if problem is None:
            raise
        raise SaveError(problem.errno, problem.strerror, str(final)) from None
    return final


def _write_atomically(final: Path, marker: dict, write_contents: Callable[[Path], None], staging=None) -> None:
    staging = staging or staging_dir(final)
    try:
        write_contents(staging)
        pause_point("save")  # test hook: SIGKILL a save whose files are written but not marked
        written = sorted(p for p in staging.rglob("*") if p.is_file())  # subdirectories too (the average's LoRA)
        marker["files"] = [str(p.relative_to(staging)) for p in written]
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2))
        give_normal_mode(staging)  # mkdtemp and safetensors make them owner-only
        for path in [*written, staging / MARKER_FILE, *(p for p in staging.rglob("*") if p.is_dir()), staging]:
            fsync_path(path)
        if final.exists():  # only when a run re-saves an epoch; move the old one out of the way first
            _remove(final)
        staging.rename(final)
        fsync_path(final.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove(path: Path) -> None:
    """Delete a checkpoint so that a crash midway never leaves a marked, partial directory: rename first."""
    doomed = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}delete-", dir=path.parent))
    path.rename(doomed / path.name)
    shutil.rmtree(doomed, ignore_errors=True)


def rotate(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; returns what was deleted."""
    doomed = [c.path for c in complete_checkpoints(root)[:-keep]] if keep > 0 else []
    for path in doomed:
        pause_point("rotate")  # test hook: SIGKILL between a new checkpoint's rename and an old one's deletion
        _remove(path)
    return doomed


# --- resuming ---------------------------------------------------------------------------------------


def resume_hint(run_dir: Path, resumed_from: str) -> str:
    """How to go on after the run in `run_dir` stopped early: from its newest checkpoint, else where it started."""
    if complete_checkpoints(run_dir / CHECKPOINTS_DIR):
        return f"resume_from={run_dir}"
    return f"resume_from={resumed_from}" if resumed_from else "start it again"


def check_resumable(checkpoint: Checkpoint, num_epochs: int, updates_per_epoch: int) -> None:
    """Refuse (before anything is written) what cannot resume. Another process count resumes (weights, optimizer
    state and counters are whole in a checkpoint; the trainer says what is not exact then)."""
    update = checkpoint.info.get("update")
    mid_epoch = isinstance(update, int) and update != checkpoint.epoch * updates_per_epoch
    if mid_epoch and not 0 < update - checkpoint.epoch * updates_per_epoch < updates_per_epoch:
        raise UserError(
            f"{str(checkpoint.path)!r} was saved mid-epoch (update {update}) with another number of updates per "
            f"epoch than this config's {updates_per_epoch}; keep train.total_samples_per_epoch and "
            "train.total_batch_size as they were"
        )
    if not (checkpoint.path / STATE_FILE).is_file():
        raise UserError(f"{str(checkpoint.path)!r} has no training state ({STATE_FILE}); it can only be evaluated")
    if checkpoint.epoch >= num_epochs:
        raise UserError(
            f"{str(checkpoint.path)!r} already has {checkpoint.epoch} epochs and num_epochs={num_epochs}; "
            "raise num_epochs to train further"
        )


# --- the training state -----------------------------------------------------------------------------


def build_training_state(
    epoch: int,
    update: int,
    trainable: list[str],
    optimizer_state: dict | None,
    scaler,
    random_states: list,
    nonfinite: list[int],
    lr_scheduler=None,
    ema: dict | None = None,
) -> dict:
    """What `training_state.pt` holds besides the LoRA: plain tensors and containers only (the learning-rate
    schedule's position too; a checkpoint without one resumes the schedule from its start; the moving average's
    state when train.ema_decay is on)."""
    return {
        "ema": ema,
        "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
        "epoch": epoch,
        "update": update,
        "trainable": trainable,
        "optimizer": optimizer_state,
        "scaler": None if scaler is None else scaler.state_dict(),
        "random": random_states,  # one entry per process, in process order: {"streams": ..., "global": ...}
        "nonfinite": nonfinite,
    }


STATE_KEYS = ("epoch", "update", "trainable", "optimizer", "scaler", "random")


def read_training_state(saved: Checkpoint, trainable: list[str] | None = None) -> dict:
    """The checkpoint's training state, checked to be complete, to hold only finite numbers and (given the
    model's trainable parameter names) to fit the model."""
    state = saved.training_state()
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(
            f"the training state of {str(saved.path)!r} lacks {', '.join(missing)}; it can only be evaluated"
        )
    if trainable is not None and state["trainable"] != trainable:
        raise UserError(f"the trainable parameters of {str(saved.path)!r} differ from this model's")
    if state["optimizer"] is None and saved.sharded_state is not None:
        return state  # sharding=fsdp: AdamW's state is in sharded/ (checked finite when it was saved)
    if not isinstance(state["optimizer"], dict) or not isinstance(state["optimizer"].get("state"), dict):
        raise UserError(f"the training state of {str(saved.path)!r} holds no optimizer state")
    if not all_finite(optimizer_tensors(state["optimizer"])):
        raise UserError(f"the optimizer state of {str(saved.path)!r} holds NaN/Inf values; resume from an earlier one")
    return state
