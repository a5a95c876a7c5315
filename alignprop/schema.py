"""The rule for every config key: type, range, finiteness, allowed values, plus the cross-key rules.

`check(config)` runs first in `runtime.validate`, before anything is written, and raises `UserError` with
one short line for the first value that breaks a rule (a user's value is quoted as at most ~80 characters).
Every key of the config must have a rule in `RULES` (a key without one is refused, and
tests/test_schema.py checks every preset), so a new key cannot be added without deciding what it accepts.

Why a small table of our own and not pydantic: pydantic is only installed as a dependency of wandb (not
pinned by us); its messages are multi-line and quote whole inputs, so every error would need translating
back to one line and a dotted key; and a ConfigDict would have to be mirrored by nested model classes.
The rules here are six small value types in one table that reads like the config it checks.

What is checked elsewhere (and reached before the run directory exists) is not repeated: the truncation
strategy's name and its cut / minmax / gaussian settings against `steps` (`truncation.Truncation`), the
batch sizes' divisibility (`batching.plan_batches`), whether files and models exist and load.

Decisions on allowed values:
- eta in [0, 1]: DDIM's range (0 deterministic, 1 DDPM-like); above 1 diffusers' DDIM step takes the square
  root of a negative number (1 - alpha_prev - sigma^2) and the samples turn NaN.
- sd_guidance_scale in [0, 100]: 1 is no guidance, 0 unconditional, in between interpolates; a negative
  scale steers away from the prompt (never what a prompt-conditioned reward wants) and is refused.
- Soup coefficients (mixing_coef_1, soup_sweep) in [-1, 2]; outside [0, 1] the soup extrapolates beyond
  the two LoRAs: allowed, with a one-line warning.
- num_epochs >= 1 for every preset (evaluation ignores it; a value is still a valid one).
- Soup options (resume_from_2, a non-default soup_mode, soup_sweep, mixing_coef_1) without
  soup_inference=True are refused with one line saying to add --config.soup_inference=True.
- Text values: at most 200 characters and no control characters (messages quote at most ~80 characters of them).
- A setting that cannot take effect is refused, naming the key that would use it (README "When things go wrong"):
  one under which no update changes the weights (`check_warmup`; Direct-Align's zero or overflowing discounts), one
  the chosen mode never reads (`check_ignored_settings`), and, when typed on the command line, a knob of a gradient
  path or loss that is not selected (`check_explicit_settings`: a preset sets every path's knobs).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from alignprop.errors import EXCERPT_CHARS, UserError, excerpt  # noqa: F401 (re-exported for tests)

logger = logging.getLogger(__name__)

MAX_TEXT = 200  # characters of any text value (paths, hub ids, names)
MAX_NAME = 64  # characters of a value chosen from a list
MAX_INT = 10**9  # every integer has an upper bound: a 400-digit number must not reach a message whole
SOUP_RANGE = (-1.0, 2.0)  # soup coefficients; outside [0, 1] warns
# Direct-Align's discounts (SRPO: 0.01 to 0.3): a loss weight of 1e300 makes every loss inf and skips every update.
MAX_DISCOUNT = 1000.0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(value) -> float | None:
    """The value as a float if it is a real number (not a bool); inf for ints too large for a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _bounds(low, high, low_open=False, high_open=False) -> str:
    show = lambda x: str(x) if isinstance(x, int) else f"{x:g}"
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {show(low)}"
    if low is None:
        return f" {'<' if high_open else '<='} {show(high)}"
    return f" in {'(' if low_open else '['}{show(low)}, {show(high)}{')' if high_open else ']'}"


# --- value types: each `problem(value)` says what is wrong ("must be ...") or returns None ------------------


@dataclass(frozen=True)
class Int:
    low: int | None = None
    high: int | None = MAX_INT
    also: tuple[int, ...] = ()  # extra allowed values (the -1 of a derived field)
    note: str = ""

    def expected(self, plural: bool = False) -> str:
        text = f"{'integers' if plural else 'an integer'}{_bounds(self.low, self.high)}"
        return " or ".join([*(str(v) for v in self.also), text]) + (f" ({self.note})" if self.note else "")

    def problem(self, value) -> str | None:
        if _is_int(value) and (
            value in self.also
            or ((self.low is None or value >= self.low) and (self.high is None or value <= self.high))
        ):
            return None
        return f"must be {self.expected()}"


@dataclass(frozen=True)
class Number:
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def expected(self, plural: bool = False) -> str:
        limits = _bounds(self.low, self.high, self.low_open, self.high_open)
        return f"{'finite numbers' if plural else 'a finite number'}{limits}" + (f" ({self.note})" if self.note else "")

    def problem(self, value) -> str | None:
        number = _as_float(value)
        if number is not None and math.isfinite(number):
            low_ok = self.low is None or (number > self.low if self.low_open else number >= self.low)
            high_ok = self.high is None or (number < self.high if self.high_open else number <= self.high)
            if low_ok and high_ok:
                return None
        return f"must be {self.expected()}"


@dataclass(frozen=True)
class Flag:
    def expected(self) -> str:
        return "True or False"

    def problem(self, value) -> str | None:
        return None if isinstance(value, bool) else "must be True or False"


@dataclass(frozen=True)
class Text:
    """A string: a path, a hub id or a name; `choices` (a function, so constants are read where they live)."""

    empty: bool = True
    choices: Callable[[], tuple[str, ...]] | None = None
    validate: Callable[[str], None] | None = None  # raises UserError (e.g. rewards.check_reward_name)
    note: str = ""
    limit: int = 0  # characters; 0: MAX_NAME for a value checked against a list, else MAX_TEXT

    def expected(self) -> str:
        if self.choices is not None:
            return f"one of: {', '.join(self.choices())}"
        text = "a text" if self.empty else "a non-empty text"
        return text + (f" ({self.note})" if self.note else "")

    def problem(self, value) -> str | None:
        if not isinstance(value, str):
            return f"must be {self.expected()}"
        limit = self.limit or (MAX_NAME if self.choices or self.validate else MAX_TEXT)
        if len(value) > limit:
            return f"must be at most {limit} characters, not {len(value)}"
        if not value.isprintable():
            return "must not contain control or other non-printable characters (newlines, tabs, NUL, ...)"
        if not value and not self.empty:
            return f"must be {self.expected()}"
        if self.choices is not None and value not in self.choices():
            return f"must be {self.expected()}"
        if self.validate is not None:
            self.validate(value)
        return None


@dataclass(frozen=True)
class Pair:
    """Two values, each following `item` (a tuple or list)."""

    item: Int | Number
    ordered: bool = False  # first <= second
    note: str = ""

    def expected(self) -> str:
        order = " with a <= b" if self.ordered else ""
        return f"a pair (a, b) of {self.item.expected(plural=True)}{order}" + (f" ({self.note})" if self.note else "")

    def problem(self, value) -> str | None:
        if not isinstance(value, tuple | list) or len(value) != 2 or any(self.item.problem(v) for v in value):
            return f"must be {self.expected()}"
        if self.ordered and value[0] > value[1]:
            return f"must be {self.expected()}"
        return None


@dataclass(frozen=True)
class Either:
    """None (when `none` says what it means) or a value that follows one of `rules` (a side or a pair of them)."""

    rules: tuple[Int | Pair, ...]
    none: str = ""  # what None means; empty: None is refused

    def expected(self) -> str:
        return " or ".join([*([f"None ({self.none})"] if self.none else []), *(r.expected() for r in self.rules)])

    def problem(self, value) -> str | None:
        if (value is None and self.none) or any(rule.problem(value) is None for rule in self.rules):
            return None
        return f"must be {self.expected()}"


@dataclass(frozen=True)
class Names:
    """A tuple of non-empty names (of at most MAX_NAME characters)."""

    what: str = "module names, e.g. ('to_q', 'to_v')"
    empty: bool = False

    def expected(self) -> str:
        return f"a {'' if self.empty else 'non-empty '}tuple of {self.what}"

    def problem(self, value) -> str | None:
        name = Text(empty=False, limit=MAX_NAME)
        if not isinstance(value, tuple | list) or not (value or self.empty) or any(name.problem(v) for v in value):
            return f"must be {self.expected()}"
        return None


@dataclass(frozen=True)
class Coefficients:
    """soup_sweep: coefficients as numbers and/or texts of comma-separated numbers, e.g. (0, 0.5, 1) or "0,0.5,1"."""

    def expected(self) -> str:
        low, high = SOUP_RANGE
        return f"a tuple of finite numbers in [{low:g}, {high:g}] (or a text like '0,0.5,1')"

    def problem(self, value) -> str | None:
        try:
            sweep_values(value)
        except _Bad:
            return f"must be {self.expected()}"
        return None


class _Bad(Exception):
    pass


def parse_coefficient(value, name: str) -> float:
    """A soup coefficient as a float (soup.py reads its values with this too)."""
    if isinstance(value, bool):
        raise UserError(f"{name}={value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise UserError(f"{name}={value!r} must be a finite number")
    return number


def sweep_values(sweep) -> list[float]:
    """The numbers of a soup_sweep value (parse_coefficient's messages for a part that is not a number)."""
    if isinstance(sweep, str):
        sweep = (sweep,)
    if not isinstance(sweep, tuple | list):
        raise _Bad
    values = []
    for item in sweep:
        if isinstance(item, str):
            if Text().problem(item):
                raise _Bad
            parts = [part.strip() for part in item.split(",")]
        elif _as_float(item) is not None:
            parts = [_as_float(item)]
        else:
            raise _Bad
        values += [parse_coefficient(part, "soup_sweep") for part in parts]
    if any(not SOUP_RANGE[0] <= v <= SOUP_RANGE[1] for v in values):
        raise _Bad
    return values


# --- choices and checks that live elsewhere (imported when used: runtime imports this module) ------------


def _precisions():
    from alignprop.models import INFERENCE_DTYPES

    return tuple(INFERENCE_DTYPES)


def _hps_versions():
    from alignprop.rewards.hps import CHECKPOINT_FILES

    return tuple(CHECKPOINT_FILES)


def _colour_targets():
    from alignprop.toyworld.rewards import COLOUR_TARGETS
    from alignprop.toyworld.world import COLOURS

    return (*COLOUR_TARGETS, *COLOURS)


def _preprocess_modes():
    from alignprop.rewards.registry import PREPROCESS_MODES

    return tuple(PREPROCESS_MODES)


def _draft_lv():
    from alignprop.paths import draft_lv

    return draft_lv


def _direct_align():
    from alignprop.paths import direct_align

    return direct_align


def _diversity_encoders():
    from alignprop.diversity import ENCODER_CHOICES

    return ENCODER_CHOICES


def _lr_schedulers():
    # diffusers.optimization's names except piecewise_constant (its step rules are a setting we do not expose);
    # cosine_with_restarts runs diffusers' default of one cycle, polynomial its default power 1.
    return ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


EVAL_PROMPT_MODES = ("all", "original")
BLANK_PROMPT_MODES = ("skip", "keep")  # prompts.py: blank lines of a prompt file skipped | kept as empty prompts
SAVE_SCHEDULES = ("periodic", "original")  # checkpoint.save_due: every save_freq-th epoch and the last | the original's
EVAL_SEEDINGS = ("sequential", "per_prompt")  # evaluate.evaluation_latents
TRACKERS = ("none", "wandb", "tensorboard")  # runtime.validate then checks that the package is installed
FINETUNE_MODES = ("lora", "full")  # trainable.py: a LoRA adapter | every denoiser weight
SHARDING_MODES = ("none", "fsdp")  # sharding.py: every process holds the denoiser | FSDP2 shards it
QUANTIZE_MODES = ("none", "int8", "fp8", "nf4")  # quantization.py: a frozen base in 8 or 4 bits, LoRA on top
SOUP_MODES = ("params", "delta")  # soup.py: mix every LoRA tensor | the two adapters side by side
# torch.compile modes of `compile_denoiser` ("default" is torch.compile's mode=None); "off" does not compile.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _one_path_component(name: str) -> None:
    if "/" in name or "\\" in name or name in (".", ".."):
        raise UserError(f"wandb.project must be a plain name (it names a directory), got {excerpt(name)}")


def _check_eval_reward_names(names: str) -> None:
    from alignprop.rewards import REGISTRY, listed_rewards

    seen = set()
    for name in listed_rewards(names):
        if name not in REGISTRY:
            raise UserError(
                f"eval_reward_fns: unknown reward {excerpt(name)}; choose from: {', '.join(sorted(REGISTRY))}"
            )
        if name in seen:
            raise UserError(f"eval_reward_fns names {name!r} twice: give each reward once")
        seen.add(name)


def _check_hub_model_id(repo_id: str) -> None:
    """A hub repo id ("name" or "namespace/name", as huggingface_hub accepts it), or empty."""
    if not repo_id:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(
            f"hub_model_id={excerpt(repo_id)} is not a hub repo id: 'name' or 'namespace/name' of letters, digits, "
            "'-', '_', '.' (at most 96 characters)"
        ) from None


def _check_reward_name(name: str) -> None:
    from alignprop.rewards import check_reward_name

    check_reward_name(name)


# --- the table ------------------------------------------------------------------------------------------

PATH = Text(note="a path")
SOURCE = Text(empty=False, note="a hub id or a local directory")
OPTIONAL_SOURCE = Text(note="empty: the default")
POSITIVE = Number(0, None, low_open=True)
SOUP_COEFFICIENT = Number(*SOUP_RANGE, note="outside [0, 1] extrapolates")

RULES: dict[str, Int | Number | Flag | Text | Pair | Either | Names | Coefficients] = {
    # run
    "seed": Int(0, 2**32 - 1),
    "logdir": Text(empty=False, note="a directory"),
    "run_name": Text(note="empty: a timestamp"),
    "num_epochs": Int(1),
    "save_freq": Int(0, note="0: no checkpoints"),
    "save_schedule": Text(choices=lambda: SAVE_SCHEDULES),
    "num_checkpoint_limit": Int(1),
    "mixed_precision": Text(choices=_precisions),
    "allow_tf32": Flag(),
    "debug": Flag(),
    "dry_run": Flag(),
    "tracker": Text(choices=lambda: TRACKERS),
    "max_nonfinite_in_a_row": Int(1),
    # resume / evaluate / soup
    "resume_from": Text(note="a run, checkpoint or LoRA directory, or 'base' (also 'stablediffusion')"),
    "resume_from_2": Text(note="a run, checkpoint or LoRA directory, or 'base' (also 'stablediffusion')"),
    "mixing_coef_1": SOUP_COEFFICIENT,
    "soup_inference": Flag(),
    "soup_mode": Text(choices=lambda: SOUP_MODES),
    "soup_sweep": Coefficients(),
    "only_eval": Flag(),
    "eval_all_checkpoints": Flag(),
    "same_evaluation": Flag(),
    "eval_images_per_prompt": Int(1),
    "eval_prompts": Text(choices=lambda: EVAL_PROMPT_MODES),
    "blank_prompts": Text(choices=lambda: BLANK_PROMPT_MODES),
    "eval_seeding": Text(choices=lambda: EVAL_SEEDINGS),
    "eval_diversity_encoder": Text(choices=_diversity_encoders),
    # visualisation
    "vis_freq": Int(0, note="0: before and after only"),
    "max_vis_images": Int(0),
    "visualize_train": Flag(),
    "visualize_eval": Flag(),
    # prompts and reward
    "prompt_fn": Text(empty=False, note="a prompt set name or a .txt path"),
    "eval_prompt_fn": Text(empty=False, note="a prompt set name or a .txt path"),
    "reward_fn": Text(empty=False, validate=_check_reward_name),
    "aesthetic_target": Number(),
    "grad_scale": POSITIVE,
    "reward_loss": Text(choices=lambda: ("reward", "threshold")),
    "reward_threshold": Number(),
    "eval_reward_fns": Text(
        validate=_check_eval_reward_names, limit=MAX_TEXT, note="comma list of reward names, empty: none"
    ),
    # sampling
    "steps": Int(1, 1000, note="DDIM steps, at most the 1000 training timesteps"),
    "sd_guidance_scale": Number(0, 100, note="1: no guidance"),
    "eta": Number(0, 1, note="DDIM: 0 deterministic, 1 DDPM-like"),
    "resolution": Either((Int(1, 16384), Pair(Int(1, 16384), note="height, width")), none="the model's native size"),
    # truncated backprop (names and ranges against steps: truncation.Truncation)
    "truncation_strategy": Text(empty=False, limit=MAX_NAME, note="auto or a strategy of alignprop.truncation"),
    "truncated_backprop": Flag(),
    "truncated_backprop_rand": Flag(),
    "truncated_backprop_minmax": Pair(Int(0, 1000), ordered=True),
    "trunc_backprop_timestep": Int(0, 1000, note="the cut of fixed; 100, the base's, is accepted while unused"),
    "truncation_gaussian_mean": Number(),
    "truncation_gaussian_std": POSITIVE,
    "flow_sigmas": Text(choices=lambda: ("pipeline", "flowbp")),
    "grad_checkpoint": Flag(),
    "decode_checkpoint": Flag(),
    "native_dtype": Flag(),
    "compile_denoiser": Text(choices=lambda: COMPILE_MODES),
    # gradient paths (names and ranges against steps: alignprop.paths.check)
    "gradient_path": Text(empty=False, limit=MAX_NAME, note="a name of alignprop.paths.NAMES"),
    "gradient_paths.refl.last_steps": Pair(Int(1, 1000), ordered=True),
    "gradient_paths.refl.uncond_gradient": Flag(),
    "gradient_paths.draft_lv.renoise": Int(1, 64),
    "gradient_paths.draft_lv.combine": Text(choices=lambda: _draft_lv().COMBINE),
    "gradient_paths.draft_lv.uncond_gradient": Flag(),
    "gradient_paths.drtune.train_steps": Int(1, 1000),
    "gradient_paths.drtune.early_stop": Number(0, 1),
    "gradient_paths.drtune.uncond_gradient": Flag(),
    "gradient_paths.direct_align.levels": Text(choices=lambda: _direct_align().LEVELS),
    "gradient_paths.direct_align.gap": Int(1, 499),
    "gradient_paths.direct_align.noise": Pair(Number(0, 1, low_open=True, high_open=True), ordered=True),
    "gradient_paths.direct_align.discount": Pair(Number(0, MAX_DISCOUNT)),
    "gradient_paths.direct_align.noise_source": Text(choices=lambda: _direct_align().NOISE_SOURCES),
    "gradient_paths.direct_align.branch": Text(choices=lambda: _direct_align().BRANCHES),
    "gradient_paths.direct_align.inversion_discount": Pair(Number(0, MAX_DISCOUNT)),
    "gradient_paths.leapalign.alpha": Number(0, 1),
    "gradient_paths.leapalign.tau": POSITIVE,
    "gradient_paths.leapalign.uncond_gradient": Flag(),
    # --- FlowBP knobs ---
    # -1: the model family's value from FlowBP's configs (alignprop/paths/flowbp_*.py: FAMILY_VALUES)
    "gradient_paths.flowbp_sparse.num_active_steps": Int(1, 1000, also=(-1,), note="-1: by model family"),
    "gradient_paths.flowbp_sparse.late_bias": Number(-1, None, note="-1: by model family, else >= 0"),
    "gradient_paths.flowbp_sparse.grad_rescale": Number(-1, None, note="-1: by model family, else >= 0"),
    "gradient_paths.flowbp_sparse.uncond_gradient": Flag(),
    "gradient_paths.flowbp_bridge.num_active_steps": Int(2, 1000),
    "gradient_paths.flowbp_bridge.late_bias": Number(-1, None, note="-1: by model family, else >= 0"),
    "gradient_paths.flowbp_bridge.grad_rescale": Number(-1, None, note="-1: by model family, else >= 0"),
    "gradient_paths.flowbp_bridge.alpha": Number(-1, 1, note="-1: by model family, else in [0, 1]"),
    "gradient_paths.flowbp_bridge.jk_sampling": Text(choices=lambda: ("uniform", "dirichlet")),
    "gradient_paths.flowbp_bridge.dirichlet_alpha_a": POSITIVE,
    "gradient_paths.flowbp_bridge.dirichlet_alpha_b": POSITIVE,
    "gradient_paths.flowbp_bridge.dirichlet_alpha_c": POSITIVE,
    "gradient_paths.flowbp_bridge.max_j_reverse": Int(0, 1000, note="0: no cap"),
    "gradient_paths.flowbp_bridge.uncond_gradient": Flag(),
    "gradient_paths.flowbp_lagrange.alpha": Number(0, 1),
    "gradient_paths.flowbp_lagrange.tau": POSITIVE,
    "gradient_paths.flowbp_lagrange.connector_order": Int(1, 1000),
    "gradient_paths.flowbp_lagrange.weight_scheme": Text(choices=lambda: ("lagrange", "uniform")),
    "gradient_paths.flowbp_lagrange.grad_support_mode": Text(choices=lambda: ("start", "midpoint", "all")),
    "gradient_paths.flowbp_lagrange.grad_support_scale": Number(0, None),
    "gradient_paths.flowbp_lagrange.max_active_supports": Int(0, 1000, note="0: no limit"),
    "gradient_paths.flowbp_lagrange.grad_rescale": Number(-1, None, note="-1: by model family, else >= 0"),
    "gradient_paths.flowbp_lagrange.anchor_lambda": Number(0, 1),
    "gradient_paths.flowbp_lagrange.jk_sampling": Text(choices=lambda: ("uniform", "dirichlet")),
    "gradient_paths.flowbp_lagrange.dirichlet_alpha_a": POSITIVE,
    "gradient_paths.flowbp_lagrange.dirichlet_alpha_b": POSITIVE,
    "gradient_paths.flowbp_lagrange.dirichlet_alpha_c": POSITIVE,
    "gradient_paths.flowbp_lagrange.max_j_reverse": Int(0, 1000, also=(-1,), note="-1: by model family; 0: no cap"),
    "gradient_paths.flowbp_lagrange.uncond_gradient": Flag(),
    # --- end FlowBP knobs ---
    "original_training_noise": Flag(),
    "offload_text_encoders": Flag(),
    "block_checkpoint": Flag(),
    "sharding": Text(choices=lambda: SHARDING_MODES),
    "vae_tiling": Flag(),
    "vae_slicing": Flag(),
    # model
    "pretrained.model": Text(empty=False, note="a hub id, a local directory or file, or tiny / toyworld"),
    "pretrained.revision": Text(empty=False),
    "pretrained.vae": Text(note="empty, or a hub id / local directory of an AutoencoderKL"),
    "pretrained.max_sequence_length": Int(0, 512, note="SD3 / FLUX T5 prompt tokens; 0: the pipeline's default"),
    "pretrained.config": Text(note="empty, or a single-file model's layout: a diffusers directory, hub id or tiny"),
    "pretrained.quantize": Text(choices=lambda: QUANTIZE_MODES, note="the frozen denoiser's storage (QLoRA-style)"),
    "pretrained.quantize_text_encoders": Text(choices=lambda: QUANTIZE_MODES, note="the text encoders' storage"),
    "lora.rank": Int(1, 1024),
    "lora.alpha": POSITIVE,
    "lora.target_modules": Names(),
    # optimisation
    "train.learning_rate": Number(0, 1, low_open=True),
    "train.adam_beta1": Number(0, 1, high_open=True),
    "train.adam_beta2": Number(0, 1, high_open=True),
    "train.adam_weight_decay": Number(0, None),
    "train.adam_epsilon": POSITIVE,
    "train.max_grad_norm": POSITIVE,
    "train.loss_coeff": POSITIVE,
    "train.use_8bit_adam": Flag(),
    "train.lr_scheduler": Text(choices=_lr_schedulers),
    "train.lr_warmup_steps": Int(0, note="optimizer updates"),
    "train.total_samples_per_epoch": Int(1),
    "train.total_batch_size": Int(1),
    "train.batch_size_per_gpu_available": Int(1),
    "train.gradient_accumulation_steps": Int(1, also=(-1,), note="derived from the batch sizes at start"),
    "train.data_loader_iterations": Int(1, also=(-1,), note="derived from the batch sizes at start"),
    "train.ema_decay": Number(0, 1, high_open=True, note="0: off"),
    "train.finetune": Text(choices=lambda: FINETUNE_MODES),
    "train.no_grad_batch_size": Int(0, note="samples per no-grad prefix call; 0: off"),
    # trackers (config.wandb, with tracker="wandb" or "tensorboard")
    "wandb.project": Text(empty=False, validate=_one_path_component),
    "wandb.entity": Text(note="empty: wandb's default"),
    "wandb.name": Text(note="empty: the run directory's name"),
    "wandb.tags": Names(what="tags", empty=True),
    # rewards (config.rewards.<name>)
    "rewards.preprocess": Text(choices=_preprocess_modes),
    "rewards.aesthetic.clip_model": SOURCE,
    "rewards.aesthetic.processor": OPTIONAL_SOURCE,
    "rewards.aesthetic.head_path": Text(note="empty: the shipped head, or head_repo"),
    "rewards.aesthetic.head_repo": Text(note="empty: the shipped head"),
    "rewards.aesthetic.head_filename": Text(empty=False),
    "rewards.hps.version": Text(choices=_hps_versions),
    "rewards.hps.checkpoint": Text(note="empty: fetched from rewards.hps.repo"),
    "rewards.hps.repo": SOURCE,
    "rewards.hps.model_name": Text(empty=False, note="an open_clip architecture"),
    "rewards.pickscore.model": SOURCE,
    "rewards.pickscore.processor": SOURCE,
    "rewards.clip_score.model": SOURCE,
    "rewards.clip_score.processor": OPTIONAL_SOURCE,
    "rewards.imagereward.checkpoint": Text(note="empty: fetched from rewards.imagereward.repo"),
    "rewards.imagereward.med_config": Text(note="empty: fetched from rewards.imagereward.repo"),
    "rewards.imagereward.repo": SOURCE,
    "rewards.imagereward.tokenizer": SOURCE,
    "rewards.toyworld.classifier": Text(note="empty: the shipped one"),
    "rewards.toyworld.colour_target": Text(choices=_colour_targets),
    "rewards.toyworld.colour_temperature": POSITIVE,
    "rewards.toyworld.area_target": Number(0, 1, low_open=True, high_open=True),
    "rewards.toyworld.position_target": Pair(Number(0, 1), note="x, y"),
    "rewards.combination": Text(note="e.g. 'aesthetic:1.0,hps:0.5'"),
    "rewards.relative_control": Names(what="two control phrases (positive, negative)", empty=True),
    # publishing
    "push_to_hub": Flag(),
    "hub_model_id": Text(validate=_check_hub_model_id, limit=MAX_TEXT, note="empty: the run directory's name"),
}

# Options that only the soup reads, with the values that mean "not asked for".
SOUP_ONLY = {"resume_from_2": "", "soup_mode": "params", "soup_sweep": (), "mixing_coef_1": 0.0}


def leaves(config, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) for every leaf of a ConfigDict, nested ones included (a key with a rule is a leaf)."""
    for key in sorted(config.keys()):
        value, name = config[key], f"{prefix}{key}"
        if hasattr(value, "keys") and name not in RULES:
            yield from leaves(value, f"{name}.")
        else:
            yield name, value


def value_at(config, key: str):
    """config's value at a dotted key (None where there is none)."""
    for part in key.split("."):
        if not hasattr(config, "keys") or part not in config:
            return None
        config = config[part]
    return config


def check_value(key: str, value) -> None:
    """One key's rule; UserError naming the key, what it accepts and (an excerpt of) what it got."""
    rule = RULES.get(key)
    if rule is None:
        raise UserError(f"config key {excerpt(key)} has no rule in alignprop/schema.py (add one there)")
    problem = rule.problem(value)
    if problem:
        raise UserError(f"{key} {problem}, got {excerpt(value)}")


def check(config) -> None:
    """Every key's rule, then the cross-key rules; raises UserError (one line) for the first problem."""
    for key, value in leaves(config):
        check_value(key, value)
    check_soup(config)
    check_eval_all_checkpoints(config)
    check_combination(config)
    check_eval_prompts(config)
    check_diversity_encoder(config)
    check_push_to_hub(config)
    check_single_file_config(config)
    check_ignored_settings(config)


def check_single_file_config(config) -> None:
    """pretrained.config is the layout of a single-file model: refused beside any other kind of model."""
    from alignprop.models import SINGLE_FILE_CONFIG_ALONE, SINGLE_FILE_SUFFIXES

    pretrained = config.get("pretrained") or {}
    if pretrained.get("config") and not str(pretrained.get("model", "")).endswith(SINGLE_FILE_SUFFIXES):
        raise UserError(SINGLE_FILE_CONFIG_ALONE.format(model=excerpt(pretrained.get("model", ""))))


# --- settings the run would ignore (README "When things go wrong": refused, each with the key that uses them) ------


def check_ignored_settings(config) -> None:
    """Values that the chosen mode never reads, or that make them do nothing, refused in one line each."""
    if config.get("hub_model_id") and not config.get("push_to_hub"):
        raise UserError("hub_model_id names the repo that push_to_hub publishes to: add --config.push_to_hub=True")
    train = config.get("train") or {}
    if train.get("lr_scheduler") == "constant" and train.get("lr_warmup_steps", 0) > 0:
        raise UserError(
            "train.lr_scheduler='constant' has no warmup, so train.lr_warmup_steps is ignored: use "
            "'constant_with_warmup' (or another schedule), or lr_warmup_steps=0"
        )
    if config.get("visualize_train") and config.get("max_vis_images", 1) < 1:
        raise UserError("visualize_train saves the first max_vis_images training images: max_vis_images=0 saves none")
    from alignprop.rewards.registry import listed_rewards

    if config.get("reward_fn") in listed_rewards(str(config.get("eval_reward_fns", ""))):
        raise UserError(
            f"eval_reward_fns names the training reward {config.reward_fn!r}, which every evaluation scores already "
            "(reward_mean): drop it from eval_reward_fns"
        )


def check_explicit_settings(config, explicit: set[str]) -> None:
    """Keys given on the command line (`explicit`: dotted names) that the chosen gradient path or loss never reads:
    refused, naming the key that would use them. (A preset sets every path's knobs; only what is typed is a
    mistake worth a line.)"""
    for key in sorted(explicit):
        section, _, knob = key.removeprefix("gradient_paths.").partition(".")
        if key.startswith("gradient_paths.") and knob and section != config.get("gradient_path"):
            raise UserError(
                f"--config.{key} is a knob of gradient_path={section!r}, but gradient_path="
                f"{config.get('gradient_path')!r}: add --config.gradient_path={section} or drop it"
            )
        if key == "reward_threshold" and config.get("reward_loss") != "threshold":
            raise UserError(
                "--config.reward_threshold is read by reward_loss='threshold' only: add "
                "--config.reward_loss=threshold or drop it"
            )


def check_warmup(train, total_updates: int) -> None:
    """A warmup at least as long as the run keeps the learning rate below train.learning_rate throughout."""
    if train.lr_scheduler != "constant" and train.lr_warmup_steps >= total_updates:
        raise UserError(
            f"train.lr_warmup_steps={train.lr_warmup_steps} >= the run's {total_updates} updates: the learning rate "
            "never reaches train.learning_rate; use fewer warmup steps (or more epochs)"
        )


def check_eval_all_checkpoints(config) -> None:
    """eval_all_checkpoints evaluates one run's checkpoints: an evaluation (only_eval), not a soup."""
    if not config.get("eval_all_checkpoints"):
        return
    if config.get("soup_inference"):
        raise UserError(
            "eval_all_checkpoints evaluates one run's checkpoints; it does not mix them: drop soup_inference"
        )
    if not config.get("only_eval"):
        raise UserError(
            "eval_all_checkpoints is an evaluation: add --config.only_eval=True (or use the evaluate preset)"
        )


def check_push_to_hub(config) -> None:
    """push_to_hub publishes the LoRA a training run produced; an evaluation or soup has none to publish."""
    if config.get("push_to_hub") and (config.get("only_eval") or config.get("soup_inference")):
        raise UserError(
            "push_to_hub publishes a trained LoRA: it needs a training run (only_eval and soup_inference off)"
        )


def check_eval_prompts(config) -> None:
    """eval_images_per_prompt counts images per line of the eval file, which "original" does not evaluate."""
    if config.get("eval_prompts") == "original" and config.get("max_vis_images", 1) < 1:
        raise UserError(
            "eval_prompts='original' evaluates train.batch_size_per_gpu_available x max_vis_images "
            "prompts: max_vis_images must be at least 1"
        )
    if config.get("eval_prompts") == "original" and config.get("eval_images_per_prompt", 1) != 1:
        raise UserError(
            "eval_images_per_prompt applies to eval_prompts='all'; eval_prompts='original' draws "
            "train.batch_size_per_gpu_available x max_vis_images prompts instead: set one or the other"
        )
    if config.get("eval_prompts") == "original" and config.get("eval_seeding") == "per_prompt":
        raise UserError(
            "eval_seeding='per_prompt' seeds image i of prompt p of the eval file; eval_prompts='original' draws "
            "prompts at random instead: use eval_prompts='all' or eval_seeding='sequential'"
        )


def check_diversity_encoder(config) -> None:
    """A named diversity encoder is the image tower of one of the run's rewards: it must be built."""
    name = config.get("eval_diversity_encoder", "auto")
    if name in ("auto", "off"):
        return
    from alignprop.rewards.registry import listed_rewards

    built = {config.get("reward_fn"), *listed_rewards(str(config.get("eval_reward_fns", "")))}
    if name not in built:
        raise UserError(
            f"eval_diversity_encoder={name!r} uses the image encoder of that reward, which this run does not build: "
            f"add it to eval_reward_fns, or use 'auto' or 'off'"
        )


def _differs(value, default) -> bool:
    return tuple(value) != default if isinstance(value, tuple | list) else value != default


def check_soup(config) -> None:
    present = {key: default for key, default in SOUP_ONLY.items() if key in config}
    given = [key for key, default in present.items() if _differs(config[key], default)]
    if not config.get("soup_inference", False):
        if given:
            options = ", ".join(given)
            raise UserError(
                f"{options} {'is a soup option' if len(given) == 1 else 'are soup options'} but soup_inference "
                "is off: add --config.soup_inference=True (or use the evaluate_soup preset)"
            )
        return
    coefficients = sweep_values(config.soup_sweep) if config.get("soup_sweep") else [config.mixing_coef_1]
    outside = [c for c in coefficients if not 0 <= c <= 1]
    if outside:
        logger.warning(
            "soup coefficient(s) %s outside [0, 1]: the soup extrapolates beyond the two LoRAs",
            excerpt(tuple(outside)),
        )


def check_combination(config) -> None:
    """rewards.combination parses (names known, weights finite) when combined is used or it is set."""
    if "rewards" not in config or "combination" not in config.rewards:
        return
    text = config.rewards.combination
    from alignprop.rewards.registry import listed_rewards

    if not text and "combined" in listed_rewards(str(config.get("eval_reward_fns", ""))):
        raise UserError(
            "eval_reward_fns names 'combined', which needs rewards.combination, e.g. 'aesthetic:1.0,hps:0.5'"
        )
    if not text and config.get("reward_fn") != "combined":
        return
    from alignprop.rewards.combined import parse_combination

    for item in text.split(","):
        name = item.partition(":")[0].strip()
        if len(name) > MAX_NAME:
            raise UserError(f"rewards.combination: {excerpt(name)} is not a reward name")
    weights = parse_combination(text)
    bad = {name: weight for name, weight in weights.items() if not math.isfinite(weight)}
    if bad:
        raise UserError(f"rewards.combination: the weights must be finite numbers, got {excerpt(bad)}")
