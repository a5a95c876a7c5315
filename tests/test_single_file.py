"""Single-file checkpoints (pretrained.model=model.safetensors) offline, with their pipeline layout given locally
(pretrained.config): a file made from the tiny pipeline's weights in the original (LDM / CompVis) key layout loads
through the real loader to exactly the tiny pipeline's weights and samples."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_main import assert_one_clear_line, run_main
from test_models import images_from

from alignprop import dry_run, hub, models, schema
from alignprop.errors import UserError

REPO = "someone/tiny-sd-layout"

# --- diffusers -> original (LDM) keys, for SD1.x-style UNets, KL VAEs and CLIP text encoders of any size -----------

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3")]
RESNET += [("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


def unet_key(key: str, config: dict) -> str:
    """openaimodel.UNetModel's name of a UNet2DConditionModel parameter: input_blocks / middle_block /
    output_blocks numbered as a flat list of (resnet, attention, resampler) layers."""
    per_block = config["layers_per_block"] + 1  # the down path adds a downsampler layer, the up path one resnet
    with_attention = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    for old, new in UNET_TOP.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        name = f"input_blocks.{per_block * block + layer + 1}.{int(kind == 'attentions')}.{rest}"
    elif match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{per_block * (int(match[1]) + 1)}.0.op.{match[2]}"
    elif match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        name = f"output_blocks.{per_block * block + layer}.{int(kind == 'attentions')}.{rest}"
    elif match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        block = int(match[1])  # the upsampler follows the block's last resnet (and its attention, if any)
        return f"output_blocks.{per_block * block + per_block - 1}.{2 if block in with_attention else 1}.{match[2]}"
    elif match := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        name = f"middle_block.{1 if match[1] == 'attentions' else 2 * int(match[2])}.{match[3]}"
    else:
        raise KeyError(key)
    if resnet := re.match(r"(input_blocks\.\d+\.0|output_blocks\.\d+\.0|middle_block\.[02])\.", name):
        rest = name[resnet.end() :]
        for diffusers_name, ldm_name in RESNET:
            rest = re.sub(rf"^{diffusers_name}\.", f"{ldm_name}.", rest)
        name = resnet[0] + rest
    return name


def vae_key(key: str, num_blocks: int) -> str:
    """ldm.models.autoencoder.AutoencoderKL's name: encoder.down.N.block.M, decoder.up counted from the bottom,
    mid.block_1/attn_1/block_2, norm_out, nin_shortcut; the attention's q/k/v/proj_out."""
    name = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
    up = lambda match: f"decoder.up.{num_blocks - 1 - int(match[1])}."  # noqa: E731
    name = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: up(m) + "block.", name)
    name = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m) + "upsample.", name)
    name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
    if "mid_block.attentions.0." in name:
        name = name.replace("mid_block.attentions.0.", "mid.attn_1.")
        for diffusers_name, ldm_name in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v")):
            name = name.replace(f".{diffusers_name}.", f".{ldm_name}.")
        name = name.replace(".to_out.0.", ".proj_out.")
    return name


def original_checkpoint(pipeline_dir: Path) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder as one state dict in the original Stable Diffusion layout."""
    unet_config = json.loads((pipeline_dir / "unet" / "config.json").read_text())
    vae_blocks = len(json.loads((pipeline_dir / "vae" / "config.json").read_text())["up_block_types"])
    unet = load_file(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(pipeline_dir / "text_encoder" / "model.safetensors")
    checkpoint = {f"model.diffusion_model.{unet_key(k, unet_config)}": v for k, v in unet.items()}
    for key, value in vae.items():
        name = vae_key(key, vae_blocks)
        conv = ".attn_1." in name and value.ndim == 2  # the original's attention projections are 1x1 convolutions
        checkpoint[f"first_stage_model.{name}"] = value[:, :, None, None] if conv else value
    # transformers >= 5.6 saves CLIPTextModel without its text_model. level; the original has it
    clip = "cond_stage_model.transformer.text_model."
    checkpoint |= {clip + key.removeprefix("text_model."): value for key, value in text.items()}
    assert len(checkpoint) == len(unet) + len(vae) + len(text), "two parameters mapped to one name"
    return {key: value.contiguous() for key, value in checkpoint.items()}


@pytest.fixture(scope="module")
def single_file(tiny_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("single") / "model.safetensors"
    save_file(original_checkpoint(tiny_dir), path)
    return path


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Offline with nothing cached: diffusers cannot fetch or find any hub config."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))


def test_the_file_is_in_the_original_layout(single_file):
    keys = set(load_file(single_file))
    for key in (  # names every SD1.x .ckpt / .safetensors uses
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    ):
        assert key in keys, key
    assert not any(part in key for key in keys for part in ("down_blocks", "up_blocks", "mid_block", "resnets"))


def test_loads_offline_with_a_local_layout_to_the_same_weights_and_samples(single_file, tiny_dir, empty_hub_cache):
    reference = models.load_pipeline(str(tiny_dir))
    loaded = models.load_pipeline(str(single_file), single_file_config=str(tiny_dir))
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
    # tokenizer and scheduler come from the layout; the loader's DDIM and frozen weights as for a directory
    assert loaded.scheduler.config == reference.scheduler.config and type(loaded.scheduler) is type(reference.scheduler)
    assert loaded.tokenizer("a cat").input_ids == reference.tokenizer("a cat").input_ids
    assert all(not p.requires_grad for p in loaded.unet.parameters())
    assert (images_from(loaded) - images_from(reference)).abs().max().item() == 0


def test_the_layout_can_be_a_short_name_or_a_cached_hub_id(single_file, tiny_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(tiny_dir, repo_dir / "snapshots" / "abc123")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    reference = models.load_pipeline(str(tiny_dir)).unet.state_dict()
    for layout in ("tiny", REPO):
        unet = models.load_pipeline(str(single_file), single_file_config=layout).unet.state_dict()
        assert all(torch.equal(unet[key], reference[key]) for key in reference), layout


def test_frozen_weights_come_in_the_inference_dtype(single_file, tiny_dir):
    pipeline = models.load_pipeline(str(single_file), dtype=torch.bfloat16, single_file_config=str(tiny_dir))
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in module.parameters())


def mismatched_layout(tiny_dir, tmp_path) -> Path:
    layout = tmp_path / "other-size"
    shutil.copytree(tiny_dir, layout)
    config = json.loads((layout / "unet" / "config.json").read_text())
    (layout / "unet" / "config.json").write_text(json.dumps({**config, "block_out_channels": [16, 64]}))
    return layout


@pytest.mark.parametrize(
    "layout, message",
    [
        ("", "needs a pipeline layout and HF_HUB_OFFLINE is set .*--config.pretrained.config=DIR$"),
        ("/no/such/dir", "pretrained.config path '/no/such/dir' does not exist"),
        ("{tmp}", "is not a diffusers pipeline directory"),
        ("someone/not-cached", "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
        ("runwayml/stable-diffusion-v1-5", "--config.pretrained.config=stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("{mismatched}", "pretrained.config must be a pipeline of the file's family and size"),
    ],
)
def test_a_layout_that_cannot_serve_is_one_line(single_file, tiny_dir, tmp_path, empty_hub_cache, layout, message):
    if layout == "{mismatched}":
        layout = str(mismatched_layout(tiny_dir, tmp_path))
    layout = layout.replace("{tmp}", str(tmp_path))
    with pytest.raises(UserError, match=message) as caught:
        models.load_pipeline(str(single_file), single_file_config=layout)
    text = str(caught.value)
    assert "\n" not in text and len(text) < 300 and ".safetensors file" not in text


def test_a_layout_beside_a_model_that_is_not_a_single_file_is_refused(preset, tiny_dir):
    config = preset("tiny")
    config.pretrained.config = str(tiny_dir)
    with pytest.raises(UserError, match="drop --config.pretrained.config"):
        schema.check(config)
    with pytest.raises(UserError, match="drop --config.pretrained.config"):
        models.load_pipeline(str(tiny_dir), single_file_config=str(tiny_dir))


def test_dry_run_lists_the_file_and_its_layout(preset, single_file, tiny_dir, empty_hub_cache):
    config = preset("tiny")
    config.pretrained.model = str(single_file)
    config.pretrained.config = str(tiny_dir)
    needs = [need for need in dry_run.needs_of(config) if need.what.startswith("model")]
    names = [need.name.removeprefix(f"{tiny_dir}: ") for need in needs]
    assert names == [
        f"{single_file} (single file)",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",  # the networks' configs only: their weights are the file's
        "tokenizer/tokenizer_config.json",
        "tokenizer/tokenizer.json",
        "unet/config.json",
        "vae/config.json",
    ]
    assert all(need.present for need in needs)
    config.pretrained.config = ""  # diffusers would infer SD1.5's hub repo from the file: not cached here
    missing = [need.name for need in dry_run.needs_of(config) if not need.present]
    layout = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert missing[0] == f"{layout}: model_index.json" and f"{layout}: unet/config.json" in missing
    assert not [name for name in missing if "safetensors" in name]  # the repo's configs, never its weights
    assert "inferred from the file" in [need for need in dry_run.needs_of(config) if not need.present][0].note


def test_the_model_card_loads_the_single_file_with_its_layout(preset, single_file, tiny_dir, tmp_path):
    config = preset("tiny")
    config.pretrained.model, config.pretrained.config = str(single_file), str(tiny_dir)
    card = hub.card_text(config, "tiny", tmp_path / "run", 1, {}, {})
    assert "base_model:" not in card  # a local file is no hub model id
    assert f'StableDiffusionPipeline.from_single_file("{single_file}", config="{tiny_dir}", ' in card


def test_a_run_session_loads_the_single_file_with_its_layout(preset, single_file, tiny_dir, tmp_path):
    from alignprop.runtime import validate
    from alignprop.session import build_session

    config = preset("tiny")
    config.pretrained.model, config.pretrained.config = str(single_file), str(tiny_dir)
    config.logdir = str(tmp_path / "logs")
    validate(config, num_processes=1)
    reference = models.load_pipeline(str(tiny_dir)).unet.state_dict()
    unet = build_session(config).model.pipeline.unet.state_dict()
    assert all(torch.equal(unet[key], reference[key]) for key in reference)
    assert not (tmp_path / "logs").exists()


def test_main_py_single_file_without_layout_offline_is_one_line(single_file, tmp_path):
    logdir = tmp_path / "logs"
    args = ["--config", "config/align_prop.py:tiny", f"--config.pretrained.model={single_file}"]
    result = run_main(*args, f"--config.logdir={logdir}", env={"HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    assert_one_clear_line(result, "--config.pretrained.config=DIR", logdir)
