"""The trainable LoRA: add it to the denoiser, fold it for no-grad calls, save it in diffusers' format.

Reading LoRA files back (checkpoints, soup, evaluation) is `alignprop.lora_files`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from alignprop.errors import UserError


def add_lora(denoiser, rank: int, alpha: float, target_modules) -> list[torch.nn.Parameter]:
    """Add a trainable LoRA adapter (peft) to the denoiser (UNet or transformer); return its parameters (fp32).

    "gaussian" init: A ~ N(0, 1/rank), B = 0, as the original LoRA attention processors did, so the
    adapted denoiser starts equal to the base one (and A gets no gradient on the first step).
    """
    if rank < 1:
        raise UserError(f"lora.rank must be a positive integer, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    try:
        denoiser.add_adapter(config)
    except ValueError as error:
        raise UserError(f"cannot add LoRA to modules {list(target_modules)}: {error}") from None
    cast_training_params(denoiser, dtype=torch.float32)
    return [p for p in denoiser.parameters() if p.requires_grad]


class FoldedLoRA:
    """The denoiser's LoRA folded into copies of the base weights, for calls that need no LoRA gradient.

    peft computes an adapted Linear as base(x) + scale * B(A(x)): a dozen extra small operators (matmuls,
    views, dtype casts) per projection, ~1500 per SD1.5 UNet call on top of the base ~2400. When the step
    is bound by operator launches that is over a third of the call (benchmarks/README.md).
    Inside `applied()`, each adapted layer runs its base Linear on W + scale * B @ A instead (what
    diffusers' `fuse_lora` does for inference); the original weights are swapped back by reference, so
    nothing drifts.

    Numerics: the folded weight is rounded once to the base dtype (bf16/fp16), like a fused LoRA at
    inference; in float32/float64 the result equals the unfolded call up to rounding. Layers with a LoRA
    variant (DoRA, ...) or a LoRA bias are left unfolded (still correct, just not faster).
    Build it when the LoRA weights are final for the call(s), e.g. once per sampling run.
    """

    def __init__(self, denoiser):
        self.layers, self.weights = [], []
        for layer in denoiser.modules():
            if isinstance(layer, LoraLayer) and _foldable(layer):
                self.layers.append(layer)
                self.weights.append(_folded_weight(layer))

    @contextlib.contextmanager
    def applied(self):
        """Run the adapted layers as plain Linears on the folded weights (no autograd into LoRA)."""
        originals = [layer.get_base_layer().weight.data for layer in self.layers]
        self._swap_in(self.weights, disable_adapters=True)
        try:
            yield
        finally:
            self._swap_in(originals, disable_adapters=False)

    def _swap_in(self, weights, disable_adapters: bool) -> None:
        for layer, weight in zip(self.layers, weights):
            layer.get_base_layer().weight.data = weight
            layer._disable_adapters = disable_adapters  # peft's own switch: forward = base layer only


def _foldable(layer: LoraLayer) -> bool:
    adapters = [name for name in layer.active_adapters if name in layer.lora_A]
    vanilla = all(name not in layer.lora_variant and not layer.lora_bias.get(name) for name in adapters)
    return bool(adapters) and vanilla and not layer.disable_adapters and not layer.merged


@torch.no_grad()
def _folded_weight(layer: LoraLayer) -> torch.Tensor:
    weight = layer.get_base_layer().weight
    exact = torch.promote_types(weight.dtype, torch.float32)  # add in at least float32, round once
    with torch.autocast(weight.device.type, enabled=False):  # the delta in the adapter's own precision
        deltas = [layer.get_delta_weight(name) for name in layer.active_adapters if name in layer.lora_A]
    return (weight.to(exact) + sum(delta.to(exact) for delta in deltas)).to(weight.dtype)


def lora_state_dict(denoiser) -> dict[str, torch.Tensor]:
    """The adapter's tensors in diffusers' LoRA format (what `save_lora_weights` writes)."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))


def save_lora(model, directory: Path) -> None:
    """Write `pytorch_lora_weights.safetensors` in the model family's layout, with the adapter metadata
    (so a reload is exact). `model`: an `alignprop.families.Family`."""
    denoiser = model.denoiser
    model.save_lora(directory, lora_state_dict(denoiser), denoiser.peft_config["default"].to_dict())
