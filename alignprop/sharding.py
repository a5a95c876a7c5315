"""`sharding="fsdp"`: the trained denoiser sharded over the processes with torch FSDP2 (`fully_shard`).

One FSDP unit per block (UNet: each down and up block and the mid block; SD3 / FLUX: each transformer block and
single-stream block), then the root (the rest: embeddings, norms, projections). Parameters, gradients and AdamW's
state are split 1/N over the processes; a unit is all-gathered for each of its calls and freed after it
(`reshard_after_forward`); gradients are reduce-scattered (mean over processes, in fp32) during the backward, which
replaces the trainer's hand-written all-reduce. The all-gather runs in the compute dtype (`mixed_precision`: bf16;
the fp32 masters stay sharded), as the memory table assumes. Text encoders, VAE and rewards stay replicated.

FSDP's all-gathers are collectives: every process must make the same sequence of denoiser calls. So under fsdp the
gradient paths' plans come from one stream shared by every process (FlowBP does the same: its timestep-selection
generator is seeded alike on every rank, `RuoyuWang-2077/FlowBP` @ 93b220a `flowbp/trainers/sd35/leapalign.py:848-852`,
sharded with FSDP at 793-806), and an evaluation gives every process the same number of batches.

Checkpoints: the trained weights are gathered whole (`gathered_state`, every process taking part) and written by the
main process in the same files as without sharding (what evaluation, soup and diffusers read); AdamW's state and the
moving average stay sharded, each process writing its own shards with torch.distributed.checkpoint (`save_sharded`),
which reads them back on any process count, sharded or not (`load_sharded`). Resuming puts the weights into the plain
modules before they are sharded; an unsharded checkpoint's whole optimizer state is cut like the weights (`split_*`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

# The denoiser's FSDP units: each element of these ModuleLists, and these single blocks; the rest is the root unit.
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")
SINGLE_BLOCKS = ("mid_block",)


def units(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The denoiser's blocks, by name, in order (the root unit is the denoiser itself)."""
    found = []
    for name, child in denoiser.named_children():
        if name in BLOCK_LISTS and isinstance(child, torch.nn.ModuleList):
            found += [(f"{name}.{index}", block) for index, block in enumerate(child)]
        elif name in SINGLE_BLOCKS and child is not None:
            found.append((name, child))
    return found


def shard_denoiser(denoiser: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Shard `denoiser` in place over every process of the (already initialised) process group."""
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    gather_dtype = None if compute_dtype == torch.float32 else compute_dtype
    policy = MixedPrecisionPolicy(param_dtype=gather_dtype, reduce_dtype=torch.float32)
    for _, block in units(denoiser):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(denoiser, mesh=mesh, mp_policy=policy, reshard_after_forward=True)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (a view: writing it writes the parameter), else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gathered(tensor):
    """The whole tensor of a sharded one (a collective: every process calls it), else the value itself."""
    return tensor.detach().full_tensor() if isinstance(tensor, DTensor) else tensor


def split_like(whole, reference: torch.Tensor):
    """`whole` cut as `reference` is sharded (each process keeps its slice; no communication), else `whole`."""
    if isinstance(whole, DTensor):  # already cut (read from a sharded checkpoint)
        return whole
    if isinstance(reference, DTensor) and torch.is_tensor(whole) and whole.shape == reference.shape:
        whole = whole.detach().to(reference.device)
        return distribute_tensor(whole, reference.device_mesh, reference.placements, src_data_rank=None)
    return whole


def gathered_state(denoiser: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The denoiser's whole state dict (only its trained parameters with `trainable_only`), on the CPU of the main
    process (the others get an empty dict). A collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(denoiser, options=options)


def split_optimizer_state(state_dict: dict, params: list[torch.Tensor]) -> dict:
    """A whole optimizer state dict (from a checkpoint) cut like `params` are sharded."""
    state = {
        index: {key: split_like(value, params[int(index)]) for key, value in values.items()}
        for index, values in state_dict["state"].items()
    }
    return {"state": state, "param_groups": state_dict["param_groups"]}


def sharded_state(denoiser: torch.nn.Module, optimizer, average: dict[str, torch.Tensor] | None) -> dict:
    """What `save_sharded` writes and `load_sharded` fills: AdamW's state by parameter name and the moving average's
    tensors by name (`average`, or None without one), each as this process holds it."""
    state = {"optimizer": get_optimizer_state_dict(denoiser, optimizer)}
    if average is not None:
        state["ema"] = average
    return state


def save_sharded(directory: Path, denoiser: torch.nn.Module, optimizer, average=None) -> None:
    """Every process writes its shards of the optimizer state and average into `directory` (a collective)."""
    dcp.save(sharded_state(denoiser, optimizer, average), checkpoint_id=directory)


def load_sharded(directory: Path, denoiser: torch.nn.Module, optimizer, average=None) -> None:
    """Read what `save_sharded` wrote, on any process count, sharded or not: into the optimizer, and in place into
    the average's tensors."""
    state = sharded_state(denoiser, optimizer, average)
    dcp.load(state, checkpoint_id=directory)
    set_optimizer_state_dict(denoiser, optimizer, optim_state_dict=state["optimizer"])
