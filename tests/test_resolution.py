"""Config key `resolution`: training and evaluation sample at that image size on every family.

Our no-grad sampler at a non-native size equals the stock pipelines' `__call__(height=H, width=W, latents=...)`;
a size a family cannot take is one line before anything is written; a short training run at a non-native size
evaluates at that size; `--config.resolution=48` and `--config.resolution="(40,48)"` parse through main.py.
The tiny models make 32x32 images (VAE factor 4): their sides must be multiples of 8 on every family.
"""

import json
import os
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import cli_runner
import pytest
import torch
from diffusers.configuration_utils import FrozenDict
from PIL import Image
from small_runs import small_config

from alignprop import models, schema
from alignprop.errors import UserError
from alignprop.families import Family, Flux, StableDiffusion3, StableDiffusionXL
from alignprop.jobs import run_job
from alignprop.presets import load_preset
from alignprop.sampling import SamplingOptions, decode, initial_latents, sample

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red cat", "a dog on grass"]
STEPS = 4
# Each family's tiny model and a guidance scale that exercises its conditioning (CFG, or FLUX-dev's embedding).
GUIDANCE = {
    "tiny": 5.0,
    "tiny_sd2v": 5.0,
    "tiny_sdxl": 5.0,
    "tiny_sd3": 5.0,
    "tiny_flux": 3.5,
    "tiny_flux_schnell": 1.0,
}
SIZES = {"square": 48, "non-square": (40, 56)}
FLOW_TARGETS = tuple(load_preset("hps_flux").lora.target_modules)


@cache
def tiny_model(name):
    return models.load_model(name)


def our_images(model, latents, guidance):
    options = SamplingOptions(STEPS, guidance)
    with torch.no_grad():
        conditioning = model.encode(PROMPTS, guided=model.guided(options))
        return (decode(model, sample(model, conditioning, latents, (False,) * STEPS, options)) + 1) / 2


# --- (1) our sampler at a size equals the stock pipeline at that size ------------------------------------------


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("name", GUIDANCE)
def test_no_grad_sampling_at_a_size_equals_the_stock_pipeline(name, size):
    model = tiny_model(name)
    model.set_resolution(size)
    height, width = (size, size) if isinstance(size, int) else size
    assert model.image_size == (height, width) != model.native_size == (32, 32)
    latents = initial_latents(2, model, torch.Generator().manual_seed(5))
    ours = our_images(model, latents, GUIDANCE[name])
    stock = model.pipeline(
        PROMPTS,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE[name],
        latents=latents,
        height=height,
        width=width,
        output_type="pt",
    ).images
    assert ours.shape == stock.shape == (2, 3, height, width)
    assert (ours - stock).abs().max() <= 1e-5
    model.set_resolution(None)
    assert model.image_size == (32, 32)


def test_the_size_reaches_sdxl_time_ids_and_the_flux_shift():
    """What the stock comparison rests on: SDXL's size ids are (H, W, 0, 0, H, W) and FLUX-dev's schedule shift
    follows the token count (at the native size the sigmas differ)."""
    sdxl = tiny_model("tiny_sdxl")
    sdxl.set_resolution((40, 56))
    time_ids = sdxl.encode(PROMPTS, guided=False).cond["added_cond_kwargs"]["time_ids"]
    assert time_ids.tolist() == [[40, 56, 0, 0, 40, 56]] * 2
    sdxl.set_resolution(None)
    flux = tiny_model("tiny_flux")
    flux.set_resolution(64)
    assert flux.latent_shape(1) == (1, 16, 16, 16) and flux.prepare_noise(torch.zeros(1, 16, 16, 16)).shape[1] == 64
    flux.set_timesteps(STEPS, "cpu")
    shifted = flux.scheduler.sigmas.clone()
    flux.set_resolution(None)
    flux.set_timesteps(STEPS, "cpu")
    assert (shifted - flux.scheduler.sigmas).abs().max() > 1e-3


# --- (2) a size the family cannot take: one line, before the run directory -------------------------------------

REFUSED = {
    "sd: not a multiple of 8": ("tiny", 36, "resolution=36: this sd model needs height and width that are multiples"),
    "sd: one side": ("tiny", (32, 44), 'got 32 x 44; e.g. --config.resolution="(32,40)"'),
    "sdxl": ("tiny_sdxl", 20, "this sdxl model needs height and width that are multiples of 8"),
    "sd3: 100": ("tiny_sd3", 100, "multiples of 8 (the VAE's factor 4 x the transformer's patch size 2)"),
    "sd3: above its position embedding": ("tiny_sd3", 136, "multiples of 8 (the VAE's factor 4 x the transformer's "),
    "flux": ("tiny_flux", (40, 44), "x 2 for the 2x2 packing of latents into tokens), got 40 x 44"),
    "zero": ("tiny", 0, "resolution must be None (the model's native size) or an integer in [1, 16384] or a pair"),
    "negative": ("tiny", -32, "got -32"),
    "zero side": ("tiny", (32, 0), "got (32, 0)"),
    "three sides": ("tiny", (32, 32, 32), "got (32, 32, 32)"),
    "a float": ("tiny", 48.0, "got 48.0"),
    "a text": ("tiny", "512", "got '512'"),
    "a flag": ("tiny", True, "got True"),
    "the toy world's reward at 48 px": (
        "tiny",
        48,
        "reward 'toyworld_shape' reads 32 x 32 images; resolution gives 48",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_size_the_family_cannot_take_is_one_line_and_writes_nothing(preset, tmp_path, case):
    model, resolution, words = REFUSED[case]
    config = small_config(preset, tmp_path, resolution=resolution, **{"pretrained.model": model})
    with pytest.raises(UserError) as error:
        run_job(config)
    message = str(error.value)
    assert words in message and "resolution" in message and "\n" not in message, message
    assert not (tmp_path / "logs").exists()


def released(family, **denoiser):
    """A family over a stand-in of a released pipeline (VAE factor 8), without weights: only its size rule is read."""
    pipeline = SimpleNamespace(vae_scale_factor=8)
    setattr(pipeline, family.denoiser_name, SimpleNamespace(config=FrozenDict(denoiser)))
    return family(pipeline)


@pytest.mark.parametrize(
    "family, denoiser, multiple, largest",
    [
        (Family, {}, 8, None),  # SD 1.x / 2.x
        (StableDiffusionXL, {}, 8, None),
        (StableDiffusion3, {"patch_size": 2, "pos_embed_max_size": 192}, 16, 3072),  # SD3 / SD3.5
        (Flux, {}, 16, None),
    ],
)
def test_the_released_models_size_rules(family, denoiser, multiple, largest):
    model = released(family, **denoiser)
    assert model.size_rule()[0] == multiple and model.largest_side() == largest
    model.set_resolution((multiple * 40, multiple * 45))
    assert model.image_size == (multiple * 40, multiple * 45)
    with pytest.raises(UserError, match=rf"multiples of {multiple} .*, got 100 x 100; e.g. --config.resolution=96$"):
        model.set_resolution(100)


def test_the_largest_sd3_side_is_its_position_embedding():
    model = tiny_model("tiny_sd3")
    assert model.largest_side() == 16 * 2 * 4  # pos_embed_max_size patches x patch size x VAE factor
    model.set_resolution((128, 8))
    with pytest.raises(UserError, match=r"and at most 128, got 136 x 128"):
        model.set_resolution((136, 128))
    model.set_resolution(None)


# --- (3) training at a size ------------------------------------------------------------------------------------


def image_sizes(directory: Path) -> set[tuple[int, int]]:
    """(height, width) of every image an evaluation wrote."""
    return {Image.open(path).size[::-1] for path in directory.glob("images/*.png")}


@pytest.mark.parametrize("model", ["toyworld", "tiny_flux"])
def test_a_short_training_run_at_a_size_evaluates_at_that_size(preset, tmp_path, model):
    # The toy-world rewards read 32x32 images only: a reward that takes any size.
    overrides = {"pretrained.model": model, "reward_fn": "colorfulness", "num_epochs": 1, "resolution": (40, 48)}
    if model == "tiny_flux":
        overrides |= {"lora.target_modules": FLOW_TARGETS, "sd_guidance_scale": 3.5}
    _, run_dir, (before, after) = run_job(small_config(preset, tmp_path, **overrides))
    assert before.images.shape[-2:] == after.images.shape[-2:] == (40, 48)
    evaluations = sorted((run_dir / "eval").iterdir())
    assert len(evaluations) == 2 and all(image_sizes(path) == {(40, 48)} for path in evaluations)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] > 0 for r in records if "grad_norm" in r] == [True, True]
    saved = json.loads((run_dir / "config.json").read_text())["resolution"]
    assert saved == [40, 48]
    schema.check_value("resolution", saved)  # what config.json holds is a value the key accepts


# --- the command line: a number and a pair both parse ---------------------------------------------------------


def main_py(tmp_path, *args):
    """`python main.py --config config/align_prop.py:tiny ARGS`: an evaluation of the base model on 2 prompts, 4 steps,
    colourfulness reward (forked from tests/cli_runner.py's helper)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a yellow background\n")
    base = [
        "--config",
        "config/align_prop.py:tiny",
        f"--config.logdir={tmp_path / 'logs'}",
        "--config.run_name=run",
        "--config.only_eval=True",
        "--config.resume_from=stablediffusion",
        "--config.reward_fn=colorfulness",
        f"--config.eval_prompt_fn={prompts}",
        "--config.steps=4",
        "--config.truncated_backprop_minmax=(0,4)",
        "--config.trunc_backprop_timestep=3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return cli_runner.run([ROOT / "main.py", *base, *args], cwd=ROOT, env=env, timeout=300)


@pytest.mark.parametrize(
    "argument, size, saved",
    [("--config.resolution=48", (48, 48), 48), ("--config.resolution=(40,48)", (40, 48), [40, 48])],
    ids=["number", "pair"],
)
def test_the_command_line_takes_a_number_or_a_pair(tmp_path, argument, size, saved):
    result = main_py(tmp_path, argument)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "logs" / "run"
    assert image_sizes(run_dir) == {size}
    assert json.loads((run_dir / "config.json").read_text())["resolution"] == saved


@pytest.mark.parametrize(
    "argument, line",
    [
        ("--config.resolution=36", "error: resolution=36: this sd model needs height and width that are multiples"),
        ("--config.resolution=(40,44)", "error: resolution=(40, 44): this sd model needs height and width that are"),
        ("--config.resolution=0", "error: resolution must be None (the model's native size) or an integer in"),
        ("--config.resolution=big", "error: resolution must be None (the model's native size) or an integer in"),
    ],
)
def test_a_bad_size_on_the_command_line_is_one_error_line(tmp_path, argument, line):
    result = main_py(tmp_path, argument)
    errors = [text for text in result.stderr.splitlines() if text.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith(line), errors
    assert not (tmp_path / "logs").exists()
