"""The flow-matching families (SD3 / SD3.5, FLUX.1 dev and schnell) on the tiny random pipelines: our sampler equals
the stock pipelines, its LoRA gradients equal the naive loop's, the LoRA file loads into the stock pipelines, the
guards, and train / checkpoint / exact resume / evaluate / soup through the job path."""

import dataclasses
import json
import logging

import pytest
import torch
from checkpoint_runs import read_metrics, run
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

from alignprop import models
from alignprop.errors import UserError
from alignprop.families import Flux, StableDiffusion3
from alignprop.lora import add_lora, save_lora
from alignprop.lora_files import LORA_FILE_NAME, add_adapter, read_lora
from alignprop.presets import load_preset
from alignprop.reference import reference_sample
from alignprop.sampling import SamplingOptions, decode, initial_latents, sample
from alignprop.tiny_families import IMAGE_SIZE, TINY_FAMILIES

# The flow presets' targets: the attention projections of the image stream and the joint-attention context.
TARGETS = tuple(load_preset("hps_flux").lora.target_modules)
STOCK = {
    "tiny_sd3": StableDiffusion3Pipeline,
    "tiny_sd35": StableDiffusion3Pipeline,
    "tiny_flux": FluxPipeline,
    "tiny_flux_schnell": FluxPipeline,
}
GUIDANCE = {"tiny_sd3": 5.0, "tiny_sd35": 5.0, "tiny_flux": 3.5, "tiny_flux_schnell": 1.0}
PROMPTS = ["a red cat", "a dog on grass"]
STEPS = 6


def stock_images(pipeline, name, latents, steps=STEPS, **call):
    """The stock pipeline's `__call__` from the same starting latents, in [0, 1]; `call`: more of its arguments."""
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE} if name.startswith("tiny_flux") else {}
    guidance = GUIDANCE[name]
    out = pipeline(
        PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=latents, output_type="pt", **size, **call
    )
    return out.images


def our_images(model, latents, guidance, steps=STEPS):
    options = SamplingOptions(steps, guidance)
    with torch.no_grad():
        conditioning = model.encode(PROMPTS, guided=model.guided(options))
        return (decode(model, sample(model, conditioning, latents, (False,) * steps, options)) + 1) / 2


def randomise_lora(denoiser, seed=1, scale=0.05):
    """Non-zero B factors, so that every LoRA factor gets a gradient and the adapter changes the images."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)


# --- (a) no-grad sampling equals the stock pipelines -------------------------------------------------------


@pytest.mark.parametrize("name", STOCK)
def test_no_grad_sampling_equals_the_stock_pipeline(name):
    model = models.load_model(name)
    assert isinstance(model, Flux if name.startswith("tiny_flux") else StableDiffusion3)
    latents = initial_latents(2, model, torch.Generator().manual_seed(5))
    ours = our_images(model, latents, GUIDANCE[name])
    stock = stock_images(model.pipeline, name, latents)
    assert ours.shape == stock.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (ours - stock).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_flux"])
def test_a_shorter_t5_prompt_is_the_stock_pipelines_max_sequence_length(name):
    """pretrained.max_sequence_length: T5 encodes that many tokens, and the images are the stock pipeline's with
    `max_sequence_length` (and differ from the default length's: the padding tokens are context)."""
    model = models.load_model(name)
    default_tokens = model.encode(PROMPTS, guided=False).cond["encoder_hidden_states"].shape[1]
    latents = initial_latents(2, model, torch.Generator().manual_seed(5))
    default_images = our_images(model, latents, GUIDANCE[name])
    model.set_max_sequence_length(24)
    tokens = model.encode(PROMPTS, guided=False).cond["encoder_hidden_states"].shape[1]
    assert default_tokens - tokens == (512 if name == "tiny_flux" else 256) - 24
    ours = our_images(model, latents, GUIDANCE[name])
    stock = stock_images(model.pipeline, name, latents, max_sequence_length=24)
    assert (ours - stock).abs().max() <= 1e-5
    assert (ours - default_images).abs().max() > 1e-3


def test_max_sequence_length_on_a_model_without_t5_is_one_clear_line(tiny_dir):
    model = models.load_model(str(tiny_dir))
    with pytest.raises(UserError, match=r"^pretrained.max_sequence_length=77 is the T5 .* leave it at 0$"):
        model.set_max_sequence_length(77)


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_flux"])
def test_starting_noise_is_what_the_stock_pipeline_draws(name):
    """One generator seed gives the stock `prepare_latents` (FLUX: drawn unpacked, then packed 2x2)."""
    model = models.load_model(name)
    ours = initial_latents(2, model, torch.Generator().manual_seed(3))
    pipeline = model.pipeline
    channels = pipeline.transformer.config.in_channels // (4 if name == "tiny_flux" else 1)
    args = (2, channels, IMAGE_SIZE, IMAGE_SIZE, torch.float32, "cpu", torch.Generator().manual_seed(3))
    stock = pipeline.prepare_latents(*args)
    stock = stock[0] if isinstance(stock, tuple) else stock
    assert torch.equal(ours, stock)
    if name == "tiny_flux":
        assert ours.shape == (2, (IMAGE_SIZE // 8) ** 2, 64) and model.unpack(ours).shape == (2, 16, 8, 8)


# --- (b) LoRA gradients equal the naive loop (float64) ----------------------------------------------------


@pytest.fixture(scope="module", params=["tiny_sd3", "tiny_flux"])
def model64(request):
    """A tiny flow model in float64 with a LoRA on the attention projections, B factors randomised."""
    model = models.load_model(request.param)
    add_lora(model.denoiser, rank=4, alpha=4, target_modules=TARGETS)
    model.pipeline.to(torch.float64)
    randomise_lora(model.denoiser)
    return model


def lora_params(model):
    return {n: p for n, p in model.denoiser.named_parameters() if "lora_" in n}


def lora_grads(model, keep_grad, naive=False, **options):
    guidance = 3.5 if isinstance(model, Flux) else 5.0
    for p in lora_params(model).values():
        p.grad = None
    sampling = SamplingOptions(len(keep_grad), guidance, **options)
    conditioning = model.encode(PROMPTS, guided=model.guided(sampling))
    latents = initial_latents(2, model, torch.Generator().manual_seed(0)).double()
    if naive:
        # The naive loop makes the original's two calls per step: FLUX has no unconditional branch, so both are
        # the prompts' (uncond + 1 * (cond - uncond) = cond); SD3 runs real CFG.
        if conditioning.uncond is None:
            conditioning, guidance = dataclasses.replace(conditioning, uncond=conditioning.cond), 1.0
        final = reference_sample(model, conditioning, latents, keep_grad, guidance)
    else:
        final = sample(model, conditioning, latents, keep_grad, sampling)
    loss = (decode(model, final) - 0.3).square().mean()
    if loss.requires_grad:
        loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in lora_params(model).items()}


PLANS = {
    "fixed_k2": (False,) * (STEPS - 2) + (True,) * 2,
    "non_contiguous": (False, True, False, False, True, False),
}


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_lora_gradients_equal_the_naive_loop(model64, plan):
    keep_grad = PLANS[plan]
    ours = lora_grads(model64, keep_grad)
    naive = lora_grads(model64, keep_grad, naive=True)
    assert len(naive) >= 2 * 11  # A and B of every adapted projection (tiny SD3: 15, tiny FLUX: 11)
    assert any("add_q_proj" in name for name in naive) and any("to_add_out" in name for name in naive)
    # Only SD3's last block's context query gets none: that block drops its context output (context_pre_only).
    unused = {name for name, grad in naive.items() if not grad.any()}
    assert unused <= {f"transformer_blocks.1.attn.add_q_proj.lora_{f}.default.weight" for f in "AB"}, unused
    for name, grad in naive.items():
        if name in unused:
            assert not ours[name].any(), name
            continue
        error = (ours[name] - grad).norm() / grad.norm()
        assert error <= 1e-5, f"{plan}: {name} relative error {error:.2e}"


def test_gradient_reaches_exactly_the_planned_steps(model64):
    keep_grad = PLANS["non_contiguous"]
    received, calls = set(), []

    def on_forward(module, args, kwargs, output):  # without checkpointing: one forward per step, in order
        step = len(calls)
        calls.append((step, kwargs["hidden_states"].shape[0]))
        if output[0].requires_grad:
            output[0].register_hook(lambda grad: received.add(step) if grad.abs().sum() > 0 else None)

    handle = model64.denoiser.register_forward_hook(on_forward, with_kwargs=True)
    try:
        lora_grads(model64, keep_grad, grad_checkpoint=False)
    finally:
        handle.remove()
    assert received == {i for i, keep in enumerate(keep_grad) if keep}
    # One denoiser evaluation per step: SD3 batches [uncond; cond], FLUX (no CFG) evaluates the prompts alone.
    batch = 2 if isinstance(model64, Flux) else 4
    assert calls == [(i, batch) for i in range(STEPS)]


# --- (c) the LoRA file: diffusers' layout, loaded by the stock pipelines ------------------------------------


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_sd35", "tiny_flux"])
def test_saved_lora_loads_into_the_stock_pipeline_and_gives_our_images(name, tmp_path):
    model = models.load_model(name)
    add_lora(model.denoiser, rank=4, alpha=8, target_modules=TARGETS)
    randomise_lora(model.denoiser)
    save_lora(model, tmp_path)
    keys = load_file(tmp_path / LORA_FILE_NAME).keys()
    # What diffusers' SD3 / FLUX LoRA scripts write: peft's names under the "transformer." prefix.
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    weights = read_lora(tmp_path)
    assert weights.prefix == "transformer." and weights.config_value("lora_alpha") == 8
    assert sorted(weights.config_value("target_modules")) == sorted(TARGETS)

    latents = initial_latents(2, model, torch.Generator().manual_seed(7))
    ours = our_images(model, latents, GUIDANCE[name])
    stock = STOCK[name].from_pretrained(TINY_FAMILIES[name]())
    stock.set_progress_bar_config(disable=True)
    with torch.no_grad():
        base = stock_images(stock, name, latents)
        stock.load_lora_weights(tmp_path)
        adapted = stock_images(stock, name, latents)
    assert (base - adapted).abs().max() > 1e-3  # the adapter does change the images
    assert (ours - adapted).abs().max() <= 1e-5

    reloaded = models.load_model(name)
    add_adapter(reloaded.denoiser, weights, "default")  # our own evaluation path
    assert (our_images(reloaded, latents, GUIDANCE[name]) - ours).abs().max() <= 1e-6


def test_a_lora_of_another_family_is_one_clear_line(tiny_dir, tmp_path):
    sd = models.load_model(str(tiny_dir))
    add_lora(sd.denoiser, rank=4, alpha=4, target_modules=("to_q", "to_k", "to_v", "to_out.0"))
    save_lora(sd, tmp_path / "sd15")
    sd3 = models.load_model("tiny_sd3")
    add_lora(sd3.denoiser, rank=4, alpha=4, target_modules=TARGETS)
    save_lora(sd3, tmp_path / "sd3")
    cases = [("sd15", models.load_model("tiny_sd3")), ("sd3", models.load_model("tiny_flux"))]
    for source, target in cases:
        with pytest.raises(UserError, match="modules this model lacks .*another base model") as error:
            add_adapter(target.denoiser, read_lora(tmp_path / source), "default")
        assert "\n" not in str(error.value)


# --- guards -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_flux"])
def test_eta_is_refused_on_flow_models(name):
    model = models.load_model(name)
    options = SamplingOptions(STEPS, GUIDANCE[name], eta=0.5)
    with pytest.raises(UserError, match=r"eta=0.5 is DDIM's .*set --config.eta=0"):
        model.guided(options)
    latents = initial_latents(1, model, torch.Generator().manual_seed(0))
    model.set_timesteps(STEPS, latents.device)
    with pytest.raises(UserError, match="eta=0.5"):
        model.step(latents, model.scheduler.timesteps[0], latents, eta=0.5)


def test_flux_dev_embeds_the_guidance_scale_and_never_runs_cfg():
    model = models.load_model("tiny_flux")
    latents = initial_latents(2, model, torch.Generator().manual_seed(0))
    assert model.guided(SamplingOptions(STEPS, 7.5)) is False
    assert model.encode(PROMPTS).uncond is None
    low, high = our_images(model, latents, 1.0), our_images(model, latents, 7.5)
    assert (low - high).abs().max() > 1e-4  # the embedding is wired in


def test_flux_schnell_ignores_the_guidance_scale_with_one_warning(caplog):
    model = models.load_model("tiny_flux_schnell")
    latents = initial_latents(2, model, torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="alignprop.families.flux"):
        high = our_images(model, latents, 7.5)
        our_images(model, latents, 7.5)
    assert [r.getMessage() for r in caplog.records] == [
        "this FLUX model (schnell) has no guidance input: sd_guidance_scale=7.5 is ignored "
        "(set it to 1 to silence this)"
    ]
    assert torch.equal(high, our_images(model, latents, 1.0))


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_flux"])
def test_offloaded_text_encoders_give_the_same_images(name):
    model = models.load_model(name)
    latents = initial_latents(2, model, torch.Generator().manual_seed(0))
    options = SamplingOptions(STEPS, GUIDANCE[name])
    expected = our_images(model, latents, GUIDANCE[name])
    model.offload_text_encoders(PROMPTS[::-1])
    with torch.no_grad():
        conditioning = model.conditioning(PROMPTS, guided=model.guided(options))
        got = (decode(model, sample(model, conditioning, latents, (False,) * STEPS, options)) + 1) / 2
    assert (got - expected).abs().max() <= 1e-6


# --- (d) train, checkpoint, exact resume, evaluate, soup: the job path --------------------------------------


def flow_config(preset, logdir, model, prompt_file, **overrides):
    """The tiny preset on a tiny flow model: compressibility reward, 4 steps, 1 update of 2 samples per epoch."""
    config = preset("tiny")
    config.logdir = str(logdir)
    config.pretrained.model = model
    config.reward_fn = "compressibility"
    config.prompt_fn = config.eval_prompt_fn = f"from_file:{prompt_file}"
    config.steps = 4
    config.sd_guidance_scale = GUIDANCE[model]
    config.truncation_strategy = "per_step_uniform"
    config.truncated_backprop_minmax = (0, 4)
    config.trunc_backprop_timestep = 3
    config.lora.target_modules = TARGETS
    config.train.total_samples_per_epoch = 2
    config.train.total_batch_size = 2
    config.train.batch_size_per_gpu_available = 2
    config.save_freq, config.vis_freq, config.max_vis_images = 1, 0, 1
    config.update(overrides)
    return config


def training_records(run_dir):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_flux"])
def test_train_resume_evaluate_and_soup_through_the_job_path(preset, tmp_path, name):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na green bird\n")
    logs = tmp_path / "logs"

    def job(run_name, **overrides):
        return run(flow_config(preset, logs, name, prompts, run_name=run_name, **overrides))

    straight, _ = job("straight", num_epochs=2)
    assert [r["update"] for r in training_records(straight)] == [1, 2]
    lora = load_file(straight / "lora" / LORA_FILE_NAME)
    assert all(key.startswith("transformer.") for key in lora)

    first, _ = job("first", num_epochs=1)
    second, _ = job("second", num_epochs=2, resume_from=str(first))
    for file in ("checkpoints/checkpoint_2/" + LORA_FILE_NAME, "lora/" + LORA_FILE_NAME):
        expected, got = load_file(straight / file), load_file(second / file)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), file
    assert training_records(first) + training_records(second) == training_records(straight)

    evaluated, result = job("evaluate", only_eval=True, resume_from=str(straight))
    final_eval = [r for r in read_metrics(straight) if r.get("eval")][-1]
    assert result.summary()["reward_mean"] == final_eval["reward_mean"]  # same LoRA, latents, sampler
    assert json.loads((evaluated / "summary.json").read_text())["num_images"] == 3

    checkpoint_1 = str(straight / "checkpoints" / "checkpoint_1")
    souped, rows = job(
        "soup", soup_inference=True, resume_from=str(straight), resume_from_2=checkpoint_1, soup_sweep=(1, 0.5)
    )
    assert (souped / "soup.csv").is_file() and [row["coefficient"] for row in rows] == [1, 0.5]
    assert rows[0]["reward_mean"] == result.summary()["reward_mean"]  # c = 1: the evaluated LoRA exactly


# --- presets --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, model, steps, guidance",
    [
        ("hps_sd35", "stabilityai/stable-diffusion-3.5-medium", 40, 4.5),
        ("hps_flux", "black-forest-labs/FLUX.1-dev", 25, 3.5),
    ],
)
def test_flow_presets_validate(preset, monkeypatch, name, model, steps, guidance):
    from alignprop import runtime

    monkeypatch.setattr(runtime, "check_model_available", lambda *args: None)  # no hub cache on CI
    config = preset(name)
    runtime.validate(config, num_processes=1)
    assert (config.pretrained.model, config.steps, config.sd_guidance_scale, config.eta) == (model, steps, guidance, 0)
    assert (config.reward_fn, config.rewards.hps.version, config.mixed_precision) == ("hps", "v2.1", "bf16")
    assert tuple(config.lora.target_modules) == TARGETS and (config.lora.rank, config.lora.alpha) == (32, 64)
    assert config.truncation_strategy == "fixed" and config.trunc_backprop_timestep == steps - 1
