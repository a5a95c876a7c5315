"""Denoiser calls per micro-batch (`GradientPath.denoiser_calls`, `expected_calls`) against the denoiser's own.

A forward pre-hook counts the denoiser's calls by whether autograd is on at the call, over whole training updates of
one micro-batch (draw, the no-grad prefix, sample, decode, score, backward) on tiny models, for every gradient path
and each setting that changes its counts, with classifier-free guidance (SD, SD3) and without (FLUX, guidance 1).
`expected_calls` is checked against the mean of `denoiser_calls` over thousands of draws, on those settings and on
every preset.
"""

import math
from contextlib import contextmanager

import pytest
import torch
from small_runs import SmoothReward, make_trainer, small_config

from alignprop import paths
from alignprop.paths.base import Calls
from alignprop.paths.flowbp_common import MEAN_DRAWS
from alignprop.presets import load_preset
from alignprop.randomness import RandomStreams
from alignprop.sampling import initial_latents, sampling_options_from_config
from alignprop.shipped import CONFIG_FILE, load_config_module

STEPS = 4
GUIDANCE = 5.0
BATCH = 2  # samples per micro-batch, one micro-batch per update
UPDATES = 2  # per case, with the no-grad prefix off and on
DRAWS = 2000
MODELS = {"sd": "tiny", "sd3": "tiny_sd3", "flux": "tiny_flux"}
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# name: (model family, gradient path, config settings): every path, and each setting that changes its counts.
CASES = {
    "truncation_fixed": ("sd", "truncation", {"truncation_strategy": "fixed", "trunc_backprop_timestep": 2}),
    "truncation_per_step_uniform": ("sd", "truncation", {"truncation_strategy": "per_step_uniform"}),
    "truncation_uniform": ("sd", "truncation", {"truncation_strategy": "uniform", "truncated_backprop_minmax": (1, 4)}),
    "truncation_gaussian": (
        "sd",
        "truncation",
        {"truncation_strategy": "gaussian", "truncation_gaussian_mean": 2.0, "truncation_gaussian_std": 1.0},
    ),
    "truncation_full": ("sd", "truncation", {"truncation_strategy": "full"}),
    "refl": ("sd", "refl", {"gradient_paths.refl.last_steps": (1, 3)}),
    "refl_uncond_gradient": (
        "sd",
        "refl",
        {"gradient_paths.refl.last_steps": (2, 4), "gradient_paths.refl.uncond_gradient": True},
    ),
    "refl_unguided": ("sd", "refl", {"gradient_paths.refl.last_steps": (1, 4), "sd_guidance_scale": 1.0}),
    "refl_flux": ("flux", "refl", {"gradient_paths.refl.last_steps": (1, 4)}),
    "draft_lv": ("sd", "draft_lv", {}),
    "draft_lv_uncond_gradient": (
        "sd",
        "draft_lv",
        {"gradient_paths.draft_lv.renoise": 1, "gradient_paths.draft_lv.uncond_gradient": True},
    ),
    "drtune": ("sd", "drtune", {"gradient_paths.drtune.train_steps": 2, "gradient_paths.drtune.early_stop": 0.75}),
    "drtune_to_the_end": (
        "sd",
        "drtune",
        {"gradient_paths.drtune.early_stop": 0.0, "gradient_paths.drtune.uncond_gradient": True},
    ),
    "direct_align_sampler": ("sd", "direct_align", {}),
    "direct_align_denoise": ("sd", "direct_align", {"gradient_paths.direct_align.branch": "denoise"}),
    "direct_align_continuous": ("sd3", "direct_align", {}),
    "leapalign": ("sd", "leapalign", {}),
    "leapalign_uncond_apart": ("sd3", "leapalign", {"gradient_paths.leapalign.uncond_gradient": False}),
    "flowbp_sparse": ("sd3", "flowbp_sparse", {"gradient_paths.flowbp_sparse.num_active_steps": 2}),
    "flowbp_sparse_uncond_gradient": ("sd3", "flowbp_sparse", {"gradient_paths.flowbp_sparse.uncond_gradient": True}),
    "flowbp_bridge": ("sd3", "flowbp_bridge", {"gradient_paths.flowbp_bridge.num_active_steps": 3}),
    "flowbp_bridge_dirichlet": ("flux", "flowbp_bridge", {"gradient_paths.flowbp_bridge.jk_sampling": "dirichlet"}),
    "flowbp_lagrange": ("sd3", "flowbp_lagrange", {}),
    "flowbp_lagrange_flux": ("flux", "flowbp_lagrange", {}),
    # every support active: the count depends on (k, j), uniform and capped
    "flowbp_lagrange_all_uniform": (
        "sd3",
        "flowbp_lagrange",
        {
            "gradient_paths.flowbp_lagrange.grad_support_mode": "all",
            "gradient_paths.flowbp_lagrange.max_active_supports": 0,
            "gradient_paths.flowbp_lagrange.jk_sampling": "uniform",
            "gradient_paths.flowbp_lagrange.max_j_reverse": 0,
        },
    ),
    "flowbp_lagrange_all_capped": (
        "sd3",
        "flowbp_lagrange",
        {
            "gradient_paths.flowbp_lagrange.grad_support_mode": "all",
            "gradient_paths.flowbp_lagrange.max_active_supports": 0,
            "gradient_paths.flowbp_lagrange.jk_sampling": "uniform",
            "gradient_paths.flowbp_lagrange.max_j_reverse": 1,
        },
    ),
    "flowbp_lagrange_all_dirichlet": (
        "sd3",
        "flowbp_lagrange",
        {
            "gradient_paths.flowbp_lagrange.grad_support_mode": "all",
            "gradient_paths.flowbp_lagrange.max_active_supports": 0,
            "gradient_paths.flowbp_lagrange.max_j_reverse": 0,
        },
    ),
}


def test_the_cases_cover_every_path():
    assert {path for _, path, _ in CASES.values()} == set(paths.NAMES)


# --- the instrumented trainer --------------------------------------------------------------------------------


class CallCounter:
    """The denoiser's forward calls, by whether autograd was on at the call."""

    def __init__(self):
        self.with_gradient = self.without_gradient = 0

    def __call__(self, module, args):
        if torch.is_grad_enabled():
            self.with_gradient += 1
        else:
            self.without_gradient += 1

    def calls(self) -> Calls:
        return Calls(self.with_gradient, self.without_gradient)


@contextmanager
def counting(denoiser):
    counter = CallCounter()
    handle = denoiser.register_forward_pre_hook(counter)
    try:
        yield counter
    finally:
        handle.remove()


def with_settings(config, settings: dict):
    """A copy of `config` with dotted `settings` set."""
    config = config.copy_and_resolve_references()
    for key, value in settings.items():
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[last] = value
    return config


@pytest.fixture(scope="module")
def trainers(preset, tmp_path_factory):
    """A trainer on each tiny model (STEPS steps, guidance GUIDANCE, one micro-batch of BATCH per update), its reward
    smooth so that every update runs its backward; no gradient checkpointing, so the backward calls nothing."""
    built = {}
    for family, model in MODELS.items():
        tmp_path = tmp_path_factory.mktemp(f"calls_{family}")
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red cat\na blue dog\na green bird\n")
        config = small_config(preset, tmp_path, eta=0.0, sd_guidance_scale=GUIDANCE, grad_checkpoint=False)
        config.pretrained.model, config.reward_fn = model, "compressibility"
        config.prompt_fn = config.eval_prompt_fn = f"from_file:{prompts}"
        config.lora.target_modules = TARGETS
        config.train.total_samples_per_epoch = config.train.total_batch_size = BATCH
        config.train.batch_size_per_gpu_available = BATCH
        trainer = make_trainer(config)
        trainer.reward = SmoothReward()
        built[family] = trainer
    return built


def path_for(trainer, name: str):
    """The case's path on `trainer`'s model, and the trainer's config with its settings."""
    _, path_name, settings = CASES[name]
    config = with_settings(trainer.config, {"gradient_path": path_name, **settings})
    paths.check(config)
    return paths.from_config(config, trainer.model.name), config


@pytest.mark.parametrize("name", list(CASES))
def test_denoiser_calls_are_the_denoisers_calls_in_training(trainers, name):
    trainer = trainers[CASES[name][0]]
    path, config = path_for(trainer, name)
    trainer.path, trainer.options = path, sampling_options_from_config(config)
    drawn = []
    draw = path.draw
    path.draw = lambda *args: drawn.append(draw(*args)) or drawn[-1]
    for chunk in (0, BATCH):  # the no-grad prefix off, then on
        trainer.config.train.no_grad_batch_size = chunk
        for _ in range(UPDATES):
            before = len(drawn)
            with counting(trainer.denoiser) as counter:
                record = trainer.train_update()
            assert len(drawn) == before + 1, "one micro-batch per update"
            plan = drawn[-1]
            assert counter.calls() == path.denoiser_calls(plan), f"{name}, chunk {chunk}: plan {plan.record()}"
            assert record["gradient_calls"] == counter.with_gradient


# --- expected calls against the mean over draws ----------------------------------------------------------------


def assert_mean_of_draws(path, model, label: str):
    """`expected_calls` against the mean of `denoiser_calls` over DRAWS plans: within 4 standard errors (of the
    difference where the expectation is itself a mean over MEAN_DRAWS Dirichlet draws), exactly where every draw
    gives the same."""
    random = RandomStreams.seeded(0, 0)
    latents = initial_latents(BATCH, model, torch.Generator().manual_seed(0)) if model is not None else None
    counts = [path.denoiser_calls(path.draw(random, model, latents)) for _ in range(DRAWS)]
    expected = path.expected_calls()
    sampled = getattr(getattr(path, "pairs", None), "mode", "") == "dirichlet"
    for field in ("with_gradient", "without_gradient"):
        values = torch.tensor([getattr(calls, field) for calls in counts], dtype=torch.float64)
        error = float(values.std()) * math.sqrt(1 / DRAWS + (1 / MEAN_DRAWS if sampled else 0))
        mean = float(values.mean())
        assert abs(getattr(expected, field) - mean) <= 4 * error + 1e-9, f"{label} {field}: {expected} vs {mean}"


@pytest.mark.parametrize("name", list(CASES))
def test_expected_calls_are_the_mean_over_draws(trainers, name):
    trainer = trainers[CASES[name][0]]
    path, _ = path_for(trainer, name)
    assert_mean_of_draws(path, trainer.model, name)


PRESET_FAMILIES = {
    "aesthetic": "sd",
    "aesthetic_k1": "sd",
    "hps": "sd",
    "hps_k1": "sd",
    "aesthetic_sdxl": "sdxl",
    "hps_sdxl": "sdxl",
    "hps_sd35": "sd3",
    "hps_flux": "flux",
    "hps_sd35_full": "sd3",
    "hps_flux_full": "flux",
    "hps_sdxl_24gb": "sdxl",
    "hps_flux_24gb": "flux",
    "tiny": "sd",
    "tiny_flow": "sd3",
}
PRESET_PATHS = [(name, None) for name in PRESET_FAMILIES] + [
    (name, path) for name in ("tiny", "tiny_flow") for path in paths.NAMES
]


@pytest.mark.parametrize("name, path_name", PRESET_PATHS)
def test_expected_calls_on_every_training_preset(trainers, name, path_name):
    """On the preset's own steps and settings; a tiny model of the family where a draw needs one (SDXL's draw,
    truncation, needs none)."""
    config = load_preset(name)
    if path_name is not None:
        config.gradient_path = path_name
    family = PRESET_FAMILIES[name]
    trainer = trainers.get(family)
    path = paths.from_config(config, family)
    assert path.expected_calls().with_gradient > 0
    assert_mean_of_draws(path, trainer.model if trainer else None, f"{name} {path.name}")


def test_the_training_presets_are_all_listed():
    presets = load_config_module(CONFIG_FILE).PRESETS
    assert set(PRESET_FAMILIES) == {name for name in presets if not load_preset(name).get("only_eval", False)}
