"""The tiny SDXL / SD2-v / SD3 / SD3.5 / FLUX pipelines: they load and sample with the stock diffusers classes,
condition the way their families do, and are built deterministically, once."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from safetensors.torch import load_file
from transformers import T5TokenizerFast

from alignprop import tiny_families
from alignprop.tiny_families import IMAGE_SIZE, TINY_FAMILIES

PIPELINES = {
    "tiny_sdxl": StableDiffusionXLPipeline,
    "tiny_sd2v": StableDiffusionPipeline,
    "tiny_sd3": StableDiffusion3Pipeline,
    "tiny_sd35": StableDiffusion3Pipeline,
    "tiny_flux": FluxPipeline,
    "tiny_flux_schnell": FluxPipeline,
}


@pytest.fixture(scope="session")
def load():
    """load(short_name) -> the stock pipeline class's from_pretrained of the cached directory (float32, CPU)."""
    return lambda name: PIPELINES[name].from_pretrained(TINY_FAMILIES[name]())


def test_every_family_has_a_pipeline_class():
    assert set(TINY_FAMILIES) == set(PIPELINES)


@pytest.mark.parametrize("name", PIPELINES)
def test_stock_pipeline_samples_finite_images(load, name):
    pipeline = load(name)
    assert type(pipeline) is PIPELINES[name]

    def sample():
        # FLUX's default size is fixed at 128 latents; the others default to the model's own sample size.
        size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE} if name.startswith("tiny_flux") else {}
        generator = torch.Generator().manual_seed(0)
        kwargs = dict(num_inference_steps=2, output_type="pt", generator=generator, **size)
        return pipeline(["a red cat", "ünïcode & digits 42"], **kwargs).images

    images = sample()
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert torch.equal(images, sample())


def test_sdxl_conditioning_is_two_clips_plus_time_ids(load):
    pipeline = load("tiny_sdxl")
    assert pipeline.config.force_zeros_for_empty_prompt
    assert pipeline.tokenizer_2.pad_token == "!"
    embeds, negative, pooled, negative_pooled = pipeline.encode_prompt("a cat", do_classifier_free_guidance=True)
    width = pipeline.text_encoder.config.hidden_size + pipeline.text_encoder_2.config.hidden_size
    assert embeds.shape == (1, 77, width) == (1, 77, pipeline.unet.config.cross_attention_dim)
    assert pooled.shape == (1, pipeline.text_encoder_2.config.projection_dim)
    assert not negative.any() and not negative_pooled.any()  # the empty prompt is zeros, as SDXL base
    time_ids = 6 * pipeline.unet.config.addition_time_embed_dim
    assert pipeline.unet.add_embedding.linear_1.in_features == time_ids + pooled.shape[1]
    ddim = DDIMScheduler.from_config(pipeline.scheduler.config)  # what the project samples with
    assert (ddim.config.set_alpha_to_one, ddim.config.clip_sample, ddim.config.steps_offset) == (False, False, 1)


def test_sd2v_predicts_v(load):
    pipeline = load("tiny_sd2v")
    config = pipeline.scheduler.config
    assert isinstance(pipeline.scheduler, DDIMScheduler)
    assert (config.prediction_type, config.beta_schedule, config.steps_offset) == ("v_prediction", "scaled_linear", 1)
    assert pipeline.unet.config.use_linear_projection and isinstance(pipeline.unet.config.attention_head_dim, list)


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_sd35"])
def test_sd3_embeddings_fit_the_transformer(load, name):
    pipeline = load(name)
    embeds, _, pooled, _ = pipeline.encode_prompt("a cat", None, None, do_classifier_free_guidance=False)
    clip_width = pipeline.text_encoder.config.hidden_size + pipeline.text_encoder_2.config.hidden_size
    config = pipeline.transformer.config
    assert clip_width < config.joint_attention_dim  # CLIP's states really are zero-padded to T5's width
    assert embeds.shape == (1, 77 + 256, config.joint_attention_dim)
    assert not embeds[:, :77, clip_width:].any()
    assert pooled.shape == (1, config.pooled_projection_dim)
    assert (config.qk_norm is not None) == (name == "tiny_sd35")
    assert pipeline.scheduler.config.shift == 3.0
    assert pipeline.vae.config.latent_channels == 16 and pipeline.vae.config.shift_factor == 0.0609


@pytest.mark.parametrize("name", ["tiny_flux", "tiny_flux_schnell"])
def test_flux_variants(load, name):
    pipeline = load(name)
    dev = name == "tiny_flux"
    assert pipeline.transformer.config.guidance_embeds == dev
    assert pipeline.scheduler.config.use_dynamic_shifting == dev
    assert pipeline.transformer.config.in_channels == 4 * pipeline.vae.config.latent_channels == 64


def test_t5_tokenizer_reads_back_and_tokenizes_anything(tmp_path):
    tiny_families.t5_tokenizer().save_pretrained(tmp_path)
    tokenizer = T5TokenizerFast.from_pretrained(tmp_path)
    ids = tokenizer("a Cat, ü!", padding="max_length", max_length=16).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:11] == ["▁", "a", "▁", "C", "a", "t", ",", "▁", "<unk>", "!", "</s>"]
    assert tokens[11:] == ["<pad>"] * 5 and tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    assert tokenizer.model_max_length == 512


def test_builds_are_deterministic_and_happen_once(tmp_path):
    for name, build in TINY_FAMILIES.items():
        first, second = build(tmp_path / "a"), build(tmp_path / "b")
        weights = sorted(path.relative_to(first) for path in first.rglob("*.safetensors"))
        assert len(weights) >= 3, name
        for path in weights:
            a, b = load_file(first / path), load_file(second / path)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, path)
        stamp = (first / "model_index.json").stat().st_mtime_ns
        assert build(tmp_path / "a") == first and (first / "model_index.json").stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no staging left behind
