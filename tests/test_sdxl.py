"""Model families I: SDXL and SD2.x v-prediction, on tiny random pipelines loaded through the real loader.

The same sampler, truncation semantics, checkpoints, evaluation and soup as SD1.5: the family object
(`alignprop.families`) is the only thing that differs.
"""

import json

import pytest
import torch
from checkpoint_runs import read_metrics, run, straight_and_resumed
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from gradient_checks import PROMPTS, float64_model_with_lora, lora_grads, relative_errors, steps_receiving_gradient
from safetensors.torch import load_file

from alignprop import checkpoint, models
from alignprop.errors import UserError
from alignprop.families import StableDiffusionXL, family_of
from alignprop.lora import add_lora, save_lora
from alignprop.lora_files import LORA_FILE_NAME, add_adapter, read_lora
from alignprop.reference import reference_sample
from alignprop.sampling import SamplingOptions, decode, initial_latents, sample

STEPS = 6
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module", params=["tiny_sdxl", "tiny_sd2v"])
def model64(request):
    """The family's tiny model in float64 with a LoRA whose B factors are non-zero (every factor gets grad)."""
    return float64_model_with_lora(request.param, TARGETS)


@pytest.mark.parametrize("keep_grad", [(False,) * (STEPS - 2) + (True,) * 2, (False, True, False, False, True, False)])
def test_gradients_equal_the_naive_loop(model64, keep_grad):
    ours, naive = lora_grads(model64, sample, keep_grad), lora_grads(model64, reference_sample, keep_grad)
    assert max(g.abs().max() for g in naive.values()) > 0, "no gradient: the comparison would prove nothing"
    for name, error in relative_errors(ours, naive).items():
        assert error <= 1e-5, f"{name} relative error {error:.2e}"


def test_denoiser_gradient_reaches_exactly_the_planned_steps(model64):
    assert steps_receiving_gradient(model64, sample, (False, True, False, False, True, False)) == {1, 4}


@pytest.mark.parametrize("name", ["tiny_sdxl", "tiny_sd2v"])
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_no_grad_sampling_equals_the_stock_pipeline(name, guidance):
    model = models.load_model(name)
    latents = initial_latents(2, model, torch.Generator().manual_seed(5))
    options = SamplingOptions(STEPS, guidance)
    with torch.no_grad():
        final = sample(model, model.encode(PROMPTS, guided=model.guided(options)), latents, (False,) * STEPS, options)
        ours = decode(model, final)
    stock = model.pipeline(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, latents=latents, output_type="pt"
    ).images
    assert (ours + 1).div(2).sub(stock).abs().max() <= 1e-5


def test_sd2v_is_v_prediction_and_sdxl_is_chosen_from_the_model():
    sd2 = models.load_model("tiny_sd2v")
    assert sd2.scheduler.config.prediction_type == "v_prediction" and isinstance(sd2.scheduler, DDIMScheduler)
    assert isinstance(models.load_model("tiny_sdxl"), StableDiffusionXL)


def test_sdxl_conditioning_is_the_pipelines_own():
    """Pooled embeddings and size/crop time ids from the pipeline's helpers; negatives zeroed as SDXL base does."""
    model = models.load_model("tiny_sdxl")
    pipeline = model.pipeline
    conditioning = model.encode(PROMPTS)
    expected_ids = pipeline._get_add_time_ids(
        (32, 32), (0, 0), (32, 32), torch.float32, pipeline.text_encoder_2.config.projection_dim
    )
    added = conditioning.cond["added_cond_kwargs"]
    assert torch.equal(added["time_ids"], expected_ids.repeat(2, 1))
    assert added["text_embeds"].shape == (2, pipeline.text_encoder_2.config.projection_dim)
    assert pipeline.config.force_zeros_for_empty_prompt
    assert conditioning.uncond["encoder_hidden_states"].abs().max() == 0
    assert conditioning.uncond["added_cond_kwargs"]["text_embeds"].abs().max() == 0
    assert conditioning.guided_kwargs()["encoder_hidden_states"].shape[0] == 4


def test_a_lora_of_another_family_is_one_clear_line(tmp_path):
    for source, target in (("tiny", "tiny_sdxl"), ("tiny_sdxl", "tiny")):
        model = models.load_model(source)
        add_lora(model.denoiser, rank=2, alpha=2, target_modules=TARGETS)
        save_lora(model, tmp_path / source)
        other = models.load_model(target)
        with pytest.raises(UserError, match="modules this model lacks"):
            add_adapter(other.denoiser, read_lora(tmp_path / source), "default")


# --- every mode through the job path ---------------------------------------------------------------------


def sdxl_config(preset, logdir, **overrides):
    config = preset("tiny")
    config.pretrained.model = "tiny_sdxl"
    config.reward_fn = "compressibility"
    config.prompt_fn, config.eval_prompt_fn = "simple_animals", "eval_simple_animals"
    config.steps, config.sd_guidance_scale = STEPS, 5.0
    config.truncation_strategy, config.truncated_backprop_minmax = "per_step_uniform", (0, STEPS)
    config.logdir, config.save_freq, config.vis_freq = str(logdir), 1, 0
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def sdxl_runs(preset, tmp_path_factory):
    """Two epochs straight; one epoch then a resume to two; an evaluation of the straight run."""
    logdir = tmp_path_factory.mktemp("sdxl")
    return straight_and_resumed(lambda *args, **overrides: sdxl_config(preset, *args, **overrides), logdir)


def test_sdxl_trains_and_resumes_bit_for_bit(sdxl_runs):
    straight, second = sdxl_runs["straight"], sdxl_runs["second"]
    name = "checkpoints/checkpoint_2/" + LORA_FILE_NAME
    expected, got = load_file(straight / name), load_file(second / name)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    updates = [r for r in read_metrics(straight) if "loss" in r]
    assert len(updates) == 4 and all(r["grad_norm"] > 0 for r in updates[1:])
    assert any(key.startswith("unet.") for key in expected)


def test_stock_sdxl_pipeline_reproduces_our_evaluation(preset, sdxl_runs):
    run_dir, ours = sdxl_runs["evaluate"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_images"] == 6
    pipeline = StableDiffusionXLPipeline.from_pretrained(models.resolve_model_source("tiny_sdxl"))
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.load_lora_weights(str(checkpoint.resolve(str(sdxl_runs["straight"])).path))
    pipeline.set_progress_bar_config(disable=True)
    config = sdxl_config(preset, "unused")
    model = family_of(pipeline)
    latents = initial_latents(len(ours.prompts), model, torch.Generator().manual_seed(config.seed))
    theirs = pipeline(
        ours.prompts, latents=latents, num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt"
    ).images
    assert (theirs - (ours.images + 1) / 2).abs().max() <= 1e-5


def test_sdxl_soup_at_one_is_the_evaluated_checkpoint(preset, sdxl_runs, tmp_path):
    config = sdxl_config(
        preset,
        tmp_path,
        run_name="soup",
        soup_inference=True,
        resume_from=str(sdxl_runs["straight"]),
        resume_from_2="stablediffusion",
        soup_mode="delta",
        soup_sweep=(0.0, 1.0),
    )
    run_dir, rows = run(config)
    _, evaluated = sdxl_runs["evaluate"]
    assert [row["coefficient"] for row in rows] == [0.0, 1.0]
    assert rows[1]["reward_mean"] == pytest.approx(evaluated.summary()["reward_mean"], abs=1e-6)
    assert rows[0]["reward_mean"] != pytest.approx(rows[1]["reward_mean"], abs=1e-6)
    assert (run_dir / "soup.csv").is_file()


def test_bad_sdxl_lora_resume_layout_is_refused(preset, sdxl_runs, tmp_path):
    config = sdxl_config(preset, tmp_path, num_epochs=3, resume_from=str(sdxl_runs["straight"]))
    config.lora.rank = 8
    from alignprop import jobs

    with pytest.raises(UserError, match="lora.rank|LoRA r="):
        jobs.prepare(config, num_processes=1)


# --- memory switches ---------------------------------------------------------------------------------------


def test_offloaded_text_encoders_give_the_same_conditioning_without_running_again():
    model = models.load_model("tiny_sdxl")
    expected = model.encode(PROMPTS + ["zebra"])
    model.offload_text_encoders(["zebra"] + PROMPTS, batch_size=2)
    calls = []
    hooks = [
        getattr(model.pipeline, name).register_forward_hook(lambda *args: calls.append(1))
        for name in model.text_encoder_names
    ]
    try:
        cached = model.conditioning(PROMPTS + ["zebra"])
        unguided = model.conditioning(PROMPTS, guided=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [], "the text encoders ran after offloading"
    for which in ("encoder_hidden_states",):
        torch.testing.assert_close(cached.cond[which], expected.cond[which], rtol=0, atol=1e-6)
        torch.testing.assert_close(cached.uncond[which], expected.uncond[which], rtol=0, atol=1e-6)
    added, cached_added = expected.cond["added_cond_kwargs"], cached.cond["added_cond_kwargs"]
    torch.testing.assert_close(cached_added["text_embeds"], added["text_embeds"], rtol=0, atol=1e-6)
    assert torch.equal(cached_added["time_ids"], added["time_ids"])
    assert unguided.uncond is None and len(unguided) == 2
    with pytest.raises(UserError, match="was not encoded"):
        model.conditioning(["an unseen prompt"])


def test_another_vae_replaces_the_pipelines(tmp_path):
    model = models.load_model("tiny_sdxl")
    with torch.no_grad():
        for param in model.vae.parameters():
            param.mul_(0.5)
    model.vae.save_pretrained(tmp_path / "vae")
    swapped = models.load_model("tiny_sdxl", vae=str(tmp_path / "vae"))
    for (name, ours), theirs in zip(swapped.vae.state_dict().items(), model.vae.state_dict().values()):
        assert torch.equal(ours, theirs), name
    assert not any(p.requires_grad for p in swapped.vae.parameters())


def test_sliced_decode_keeps_the_gradient_path():
    model = models.load_model("tiny_sdxl")
    latents = initial_latents(2, model, torch.Generator().manual_seed(3)).requires_grad_()
    plain = decode(model, latents)
    model.vae.enable_slicing()
    sliced = decode(model, latents)
    torch.testing.assert_close(sliced, plain, rtol=0, atol=1e-5)  # batch 1 vs 2 kernels round differently
    sliced.sum().backward()
    assert latents.grad is not None and latents.grad.abs().max() > 0
