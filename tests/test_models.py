"""Loading through the real loader: round trip, freezing, dtypes, LoRA, and clear errors."""

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from alignprop import models
from alignprop.errors import UserError
from alignprop.families import family_of
from alignprop.lora import add_lora
from alignprop.sampling import SamplingOptions, decode, initial_latents, sample
from alignprop.tiny import build_tiny_pipeline

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def images_from(pipeline, steps=6):
    model = family_of(pipeline)
    latents = initial_latents(2, model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        final = sample(model, model.encode(["cat", "dog"]), latents, (False,) * steps, SamplingOptions(steps, 5.0))
        return decode(model, final)


def test_saved_and_reloaded_tiny_pipeline_gives_identical_samples(tiny_dir, tmp_path):
    in_memory = build_tiny_pipeline(tmp_path)
    in_memory.scheduler = DDIMScheduler.from_config(in_memory.scheduler.config)
    for module in (in_memory.unet, in_memory.vae, in_memory.text_encoder):
        module.eval()  # as the loader leaves them (train mode takes other kernels: ~1e-6 differences)
    loaded = models.load_pipeline(str(tiny_dir))
    assert torch.equal(images_from(in_memory), images_from(loaded))


def test_short_name_loads_the_same_model(tiny_dir):
    by_name, by_path = models.load_pipeline("tiny"), models.load_pipeline(str(tiny_dir))
    for a, b in zip(by_name.unet.state_dict().values(), by_path.unet.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("precision, dtype", [("no", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_frozen_weights_in_inference_dtype_and_lora_in_fp32(tiny_dir, precision, dtype):
    pipeline = models.load_pipeline(str(tiny_dir), dtype=models.inference_dtype(precision))
    assert isinstance(pipeline.scheduler, DDIMScheduler)
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        assert all(not p.requires_grad and p.dtype == dtype for p in module.parameters())
    params = add_lora(pipeline.unet, rank=4, alpha=4, target_modules=TARGETS)
    names = [n for n, p in pipeline.unet.named_parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    assert all("lora_" in n for n in names)
    # rank 4 on every targeted projection: to_q/to_k/to_v/to_out.0 in every attention
    attention_count = sum(1 for n, _ in pipeline.unet.named_modules() if n.endswith(".to_q"))
    assert len(params) == 2 * len(TARGETS) * attention_count
    assert all(4 in p.shape for p in params)


def test_lora_starts_as_the_base_model(tiny_dir):
    pipeline = models.load_pipeline(str(tiny_dir))
    before = images_from(pipeline)
    add_lora(pipeline.unet, rank=4, alpha=4, target_modules=TARGETS)
    assert torch.equal(before, images_from(pipeline))


def test_inference_dtype_names():
    with pytest.raises(UserError, match="mixed_precision"):
        models.inference_dtype("fp8")


def test_retired_hub_id_names_the_mirror():
    with pytest.raises(UserError, match="stable-diffusion-v1-5/stable-diffusion-v1-5"):
        models.load_pipeline("runwayml/stable-diffusion-v1-5")


def test_missing_local_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        models.load_pipeline(str(tmp_path / "no-such-model"))


def test_unsupported_single_file_is_a_user_error(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("not a checkpoint")
    with pytest.raises(UserError, match="safetensors"):
        models.load_pipeline(str(path))


def test_uncached_hub_id_offline_says_how_to_use_a_local_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError, match="local diffusers directory"):
        models.load_pipeline("someone/not-cached-model")


def test_bad_lora_targets_are_a_user_error(tiny_dir):
    pipeline = models.load_pipeline(str(tiny_dir))
    with pytest.raises(UserError, match="LoRA"):
        add_lora(pipeline.unet, rank=4, alpha=4, target_modules=("no_such_layer",))


def test_the_short_names_family_table_is_what_each_short_name_loads():
    """models.SHORT_NAME_FAMILIES (what the dry run says before loading) against each model's model_index.json."""
    import json

    from alignprop.families import family_class

    assert set(models.SHORT_NAME_FAMILIES) == set(models.SHORT_NAMES)
    for name, family in models.SHORT_NAME_FAMILIES.items():
        index = json.loads((Path(models.resolve_model_source(name)) / "model_index.json").read_text())
        assert family_class(index["_class_name"]).name == family, name
