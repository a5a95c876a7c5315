"""Model soup: evaluate a mix of two LoRAs or full fine-tunings (or of one and the base model) at one or many
coefficients.

Two modes, for A = resume_from, B = resume_from_2 ("base", or the original's "stablediffusion": the base model, no
LoRA) and c = the coefficient:

- "params" (the original's): every LoRA tensor is mixed, c*A + (1-c)*B, and the result is used as one
  LoRA. Both factors of each update (down and up) are scaled, so the weight delta is *not* linear in c:
  against the base model it is c^2 * dW_A, and between two LoRAs it has cross terms c(1-c)(B_A A_B + ...).
- "delta": the two adapters are loaded side by side with weights c and 1-c (diffusers' `set_adapters`),
  so the UNet's weights are W + c*dW_A + (1-c)*dW_B exactly, linear in c. Ranks and targets may differ.

Two full fine-tunings (`train.finetune="full"`: denoiser folders), or one against the base model, mix every denoiser
weight, c*A + (1-c)*B (B: the base weights): linear in c, so both modes give the same soup. A LoRA is not mixed with a
full denoiser.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from alignprop import checkpoint
from alignprop.checkpoint import BASE_MODEL, is_base_model
from alignprop.denoiser_files import check_fits, is_denoiser_folder, read_denoiser_state
from alignprop.errors import UserError
from alignprop.evaluate import EvalResult, evaluation_context, evaluator_for, log_to_trackers, write_evaluation
from alignprop.lora_files import LoraWeights, add_adapter, check_same_layout, copy_into_adapter, read_lora
from alignprop.plot import Panel, Series, save_panels
from alignprop.schema import SOUP_MODES, parse_coefficient
from alignprop.session import start_trackers

TABLE_NAME = "soup"  # soup.csv, soup.json, soup.png


@dataclass(frozen=True)
class DenoiserWeights:
    """A full fine-tuning's denoiser, every tensor (read from its folder, `source`)."""

    tensors: dict[str, torch.Tensor]
    source: Path


@dataclass(frozen=True)
class SoupInputs:
    a: LoraWeights | DenoiserWeights
    b: LoraWeights | DenoiserWeights | None  # None: the base model
    mode: str
    coefficients: tuple[float, ...]


def parse_coefficients(config) -> tuple[float, ...]:
    """`soup_sweep` if given (numbers, or text like "0,0.5,1"), else (`mixing_coef_1`,); duplicates dropped."""
    sweep = config.soup_sweep
    if isinstance(sweep, str):
        sweep = (sweep,)
    if not sweep:
        return (parse_coefficient(config.mixing_coef_1, "mixing_coef_1"),)
    values = []
    for item in sweep:
        parts = item.split(",") if isinstance(item, str) else [item]
        values += [parse_coefficient(part.strip() if isinstance(part, str) else part, "soup_sweep") for part in parts]
    return tuple(dict.fromkeys(values))


def read_source(source: str, key: str, base_allowed: bool = False) -> LoraWeights | DenoiserWeights:
    if not source:
        base = f", or {BASE_MODEL!r} for the base model" if base_allowed else ""
        raise UserError(f"soup_inference needs {key}: a checkpoint, run directory, LoRA or denoiser directory{base}")
    path = checkpoint.resolve_weights(source)
    if is_denoiser_folder(path):
        return DenoiserWeights(read_denoiser_state(path), path)
    return read_lora(path)


def prepare(config) -> SoupInputs:
    """Read and check the soup's inputs (before the run directory is created)."""
    if config.soup_mode not in SOUP_MODES:
        raise UserError(f"soup_mode={config.soup_mode!r}; choose one of: {', '.join(SOUP_MODES)}")
    coefficients = parse_coefficients(config)
    a = read_source(config.resume_from, "resume_from")
    b = None if is_base_model(config.resume_from_2) else read_source(config.resume_from_2, "resume_from_2", True)
    if b is not None and type(a) is not type(b):
        kinds = {LoraWeights: "a LoRA", DenoiserWeights: "a whole denoiser (train.finetune=full)"}
        raise UserError(
            f"resume_from is {kinds[type(a)]}, resume_from_2 {kinds[type(b)]}: a soup mixes two of a kind "
            f"(or one against the base model, {BASE_MODEL!r})"
        )
    if b is not None and config.soup_mode == "params" and isinstance(a, LoraWeights):
        check_same_layout(a, b)
    return SoupInputs(a, b, config.soup_mode, coefficients)


def mix_parameters(a: LoraWeights, b: LoraWeights | None, coefficient: float) -> LoraWeights:
    """The original's soup: coef*A + (1-coef)*B for every tensor (coef*A alone against the base model)."""
    if b is None:
        tensors = {key: coefficient * tensor for key, tensor in a.tensors.items()}
    else:
        tensors = {key: coefficient * tensor + (1 - coefficient) * b.tensors[key] for key, tensor in a.tensors.items()}
    return LoraWeights(tensors, a.metadata, a.source)


class DenoiserSoup:
    """A denoiser whose every weight is c*A + (1-c)*B (B: its own base weights), mixed in fp32 (full fine-tunings)."""

    def __init__(self, denoiser, inputs: SoupInputs):
        for weights in (inputs.a, inputs.b):
            if weights is not None:
                check_fits(denoiser, weights.source, weights.tensors)
        if inputs.b is None:  # the base weights, copied before the first mix overwrites them
            b = {key: tensor.detach().clone() for key, tensor in denoiser.state_dict().items()}
        else:
            b = inputs.b.tensors
        self.denoiser, self.a, self.b = denoiser, inputs.a.tensors, b

    def set_coefficient(self, coefficient: float) -> None:
        mixed = {key: coefficient * a.float() + (1 - coefficient) * self.b[key].float() for key, a in self.a.items()}
        with torch.no_grad():
            self.denoiser.load_state_dict(mixed, strict=True)


def make_soup(denoiser, inputs: SoupInputs):
    """The soup for the inputs' kind: LoRAs (`Soup`) or whole denoisers (`DenoiserSoup`)."""
    return DenoiserSoup(denoiser, inputs) if isinstance(inputs.a, DenoiserWeights) else Soup(denoiser, inputs)


class Soup:
    """A UNet whose LoRA is the mix of A and B at a coefficient that `set_coefficient` changes in place."""

    def __init__(self, unet, inputs: SoupInputs):
        self.unet, self.inputs = unet, inputs
        if inputs.mode == "params":
            add_adapter(unet, mix_parameters(inputs.a, inputs.b, 1.0), "soup")
        else:
            add_adapter(unet, inputs.a, "a")
            if inputs.b is not None:
                with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the point
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    add_adapter(unet, inputs.b, "b")

    def set_coefficient(self, coefficient: float) -> None:
        a, b = self.inputs.a, self.inputs.b
        if self.inputs.mode == "params":
            copy_into_adapter(self.unet, mix_parameters(a, b, coefficient), "soup")
        elif b is None:
            self.unet.set_adapters(["a"], weights=[coefficient])
        else:
            self.unet.set_adapters(["a", "b"], weights=[coefficient, 1 - coefficient])


def effective_deltas(unet) -> dict[str, torch.Tensor]:
    """The weight change every LoRA layer applies now (sum over its active adapters, with their scales)."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            active = [a for a in module.active_adapters if a in module.lora_A]
            deltas[name] = sum(module.get_delta_weight(adapter) for adapter in active)
    return deltas


# --- the soup run -----------------------------------------------------------------------------------


def table_row(coefficient: float, mode: str, result: EvalResult, directory: str) -> dict:
    return {"mode": mode, "coefficient": coefficient, **result.summary(), "images": directory}


def write_table(rows: list[dict], directory: Path, context: dict) -> None:
    """soup.csv and soup.json (reward vs coefficient) and soup.png (its plot, ± one std)."""
    with (directory / f"{TABLE_NAME}.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (directory / f"{TABLE_NAME}.json").write_text(json.dumps({**context, "rows": rows}, indent=2) + "\n")
    save_panels([soup_panel(rows, context)], directory / f"{TABLE_NAME}.png", columns=1)


def soup_panel(rows: list[dict], context: dict) -> Panel:
    """Reward mean +- std against the coefficient: a tick at each coefficient swept, the y axis inside the range the
    images' rewards took (`context["reward_range"]`; a bounded reward's std bar would run past its bounds)."""
    ordered = sorted(rows, key=lambda row: row["coefficient"])
    coefficients = [row["coefficient"] for row in ordered]
    series = Series(coefficients, [row["reward_mean"] for row in ordered], [row["reward_std"] for row in ordered])
    return Panel(
        f"soup ({context['soup_mode']}): {context['reward_fn']} reward vs mixing_coef_1",
        "mixing_coef_1 (weight of resume_from)",
        "reward (mean +- std)",
        [series],
        x_ticks=coefficients,
        y_limits=tuple(context["reward_range"]) if "reward_range" in context else None,
    )


def coefficient_dir(coefficient: float) -> str:
    return f"coef_{coefficient:g}"


def run_soup(session, config, batch_size: int, run_dir: Path, inputs: SoupInputs) -> list[dict]:
    """Evaluate the soup at every coefficient; run_dir/coef_<c>/ holds each evaluation, soup.* the table."""
    evaluator = evaluator_for(session, config, batch_size)
    start_trackers(session, config, run_dir)
    soup = make_soup(session.model.denoiser, inputs)
    accelerator, rows, low, high = evaluator.accelerator, [], float("inf"), float("-inf")
    b_name = BASE_MODEL if inputs.b is None else str(inputs.b.source)
    context = {
        **evaluation_context(config, str(inputs.a.source), "soup"),
        "soup_mode": inputs.mode,
        "resume_from_2": b_name,
    }
    for step, coefficient in enumerate(inputs.coefficients):
        soup.set_coefficient(coefficient)
        evaluator.label = f"soup {step + 1}/{len(inputs.coefficients)} c={coefficient:g}"  # its progress bar
        result = evaluator(config.seed)
        if accelerator.is_main_process:
            name = coefficient_dir(coefficient)
            summary = write_evaluation(result, run_dir / name, {**context, "mixing_coef_1": coefficient})
            log_to_trackers(accelerator, "soup", {"mixing_coef_1": coefficient, **summary}, None, step=step)
            rows.append(table_row(coefficient, inputs.mode, result, name))
            low, high = min(low, result.rewards.min().item()), max(high, result.rewards.max().item())
    if accelerator.is_main_process:
        write_table(rows, run_dir, {**context, "reward_range": [low, high]})  # the images' lowest and highest
    accelerator.end_training()
    return rows
