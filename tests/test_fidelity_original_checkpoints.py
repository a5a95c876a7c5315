"""Checkpoints of the original AlignProp code: read, evaluated and souped like our own.

The original saved accelerate state directories (`checkpoints/checkpoint_N/`) whose LoRA is
`pytorch_lora_weights.bin`, written by `unet.save_attn_procs`: a torch pickle of the old attention processors'
layers, keys `<attention>.processor.to_{q,k,v,out}_lora.{down,up}.weight`. `write_original_checkpoint` writes
that layout by hand from a peft-adapted tiny UNet, independently of the conversion under test.
"""

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from alignprop import checkpoint, jobs, soup
from alignprop.errors import UserError
from alignprop.lora_files import (
    ORIGINAL_LORA_FILE_NAME,
    add_adapter,
    check_matches_config,
    check_same_layout,
    is_original_checkpoint,
    read_lora,
)

RANK = 4
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every projection the original's processors adapted
OLD_NAMES = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}


def old_key(peft_key: str) -> str:
    """`<attention>.to_out.0.lora_B.weight` -> `<attention>.processor.to_out_lora.up.weight`."""
    module, _, factor = peft_key.partition(".lora_")
    for target, old in OLD_NAMES.items():
        if module.endswith("." + target):
            attention = module[: -len(target) - 1]
            return f"{attention}.processor.{old}.{'down' if factor.startswith('A') else 'up'}.weight"
    raise AssertionError(peft_key)


def write_original_checkpoint(unet, directory: Path, prefix: str = "") -> Path:
    """An accelerate state directory as the original saved it: the LoRA in the old layout, plus optimizer state."""
    directory.mkdir(parents=True)
    layers = {prefix + old_key(key): value.clone() for key, value in get_peft_model_state_dict(unet).items()}
    torch.save(layers, directory / ORIGINAL_LORA_FILE_NAME)
    torch.save({"state": {}, "param_groups": []}, directory / "optimizer.bin")  # ours never reads it
    return directory


def load_unet(tiny_dir) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(Path(tiny_dir) / "unet").eval()


@pytest.fixture(scope="module")
def adapted(tiny_dir):
    """The tiny UNet with a rank-4, alpha-4 LoRA (scale 1, like the original's processors), all factors random."""
    unet = load_unet(tiny_dir)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=list(TARGETS)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return unet


@pytest.fixture(scope="module")
def original_dir(adapted, tmp_path_factory):
    return write_original_checkpoint(adapted, tmp_path_factory.mktemp("original") / "checkpoint_3")


def unet_inputs(unet, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    sample = torch.randn(2, unet.config.in_channels, size, size, generator=generator)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor([10, 500]), context


@pytest.mark.parametrize("prefix", ["", "unet."])
def test_read_lora_gives_the_same_tensors(adapted, tmp_path, prefix):
    directory = write_original_checkpoint(adapted, tmp_path / "checkpoint_1", prefix)
    weights = read_lora(directory)
    expected = get_peft_model_state_dict(adapted)
    converted = weights.denoiser_state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[key], expected[key]) for key in expected)
    assert weights.from_original_code and weights.metadata is None
    # No metadata: rank from the shapes, alpha = rank (what diffusers assumes, and what the processors did).
    assert (weights.config_value("r"), weights.config_value("lora_alpha")) == (RANK, RANK)
    assert weights.config_value("target_modules") == sorted(TARGETS)


def test_evaluating_it_gives_the_adapted_unet(adapted, original_dir, tiny_dir):
    fresh = load_unet(tiny_dir)
    add_adapter(fresh, read_lora(original_dir), adapter_name="default")
    inputs = unet_inputs(fresh)
    with torch.no_grad():
        expected = adapted(*inputs).sample
        got = fresh(*inputs).sample
        base = load_unet(tiny_dir)(*inputs).sample
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-2  # the LoRA matters: the comparison above is not vacuous


def test_each_projection_adds_up_down_unscaled_as_the_old_processors_did(original_dir, tiny_dir):
    """The old LoRAAttnProcessor: `attn.to_q(h) + scale * to_q_lora(h)`, scale 1 and no network_alpha,
    i.e. W x + up(down(x)). Checked on every adapted projection with the tensors straight from the .bin file."""
    old = torch.load(original_dir / ORIGINAL_LORA_FILE_NAME, weights_only=True)
    fresh = load_unet(tiny_dir)
    add_adapter(fresh, read_lora(original_dir), adapter_name="default")
    modules = dict(fresh.named_modules())
    checked = 0
    for key in old:
        if not key.endswith(".down.weight"):
            continue
        attention, _, rest = key.partition(".processor.")
        target = next(t for t, name in OLD_NAMES.items() if rest.startswith(name + "."))
        layer = modules[f"{attention}.{target}"]
        down, up = old[key], old[key.replace(".down.", ".up.")]
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(checked))
        with torch.no_grad():
            assert torch.allclose(layer(x), layer.base_layer(x) + x @ down.T @ up.T, atol=1e-5), key
        checked += 1
    assert checked == len(old) // 2 > 0


@pytest.fixture(scope="module")
def our_lora_dir(adapted, tmp_path_factory):
    """The same adapter saved in our (diffusers) format, as the soup's partner."""
    directory = tmp_path_factory.mktemp("ours")
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(adapted)),
        unet_lora_adapter_metadata=adapted.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
    return directory


def test_only_eval_and_soup_resolve_the_directory(preset, original_dir, our_lora_dir):
    assert is_original_checkpoint(original_dir) and not is_original_checkpoint(our_lora_dir)
    assert checkpoint.resolve_weights(str(original_dir)) == original_dir / ORIGINAL_LORA_FILE_NAME

    config = preset("evaluate")
    config.resume_from = str(original_dir)
    assert jobs.evaluation_weights(config) == original_dir / ORIGINAL_LORA_FILE_NAME

    config = preset("evaluate_soup")
    config.resume_from, config.resume_from_2 = str(original_dir), str(our_lora_dir)
    inputs = soup.prepare(config)  # parameter mixing checks the two layouts are the same
    mixed = soup.mix_parameters(inputs.a, inputs.b, 0.25)
    ours = read_lora(our_lora_dir)
    assert mixed.tensors.keys() == ours.tensors.keys()
    assert all(torch.allclose(mixed.tensors[k], ours.tensors[k]) for k in ours.tensors)  # A and B are the same LoRA


def test_matches_a_config_of_the_same_shape(original_dir, preset):
    weights = read_lora(original_dir)
    check_matches_config(weights, preset("aesthetic").lora)  # rank 4, alpha 4, the four projections
    check_same_layout(weights, weights)


class NotATensor:
    pass


def test_files_needing_code_or_of_another_layout_are_refused(tmp_path):
    directory = tmp_path / "checkpoint_0"
    directory.mkdir()
    torch.save({"a.processor.to_q_lora.down.weight": NotATensor()}, directory / ORIGINAL_LORA_FILE_NAME)
    with pytest.raises(UserError, match=r"needs arbitrary code to unpickle"):
        read_lora(directory)
    torch.save({"a.to_q.weight": torch.zeros(2, 2)}, directory / ORIGINAL_LORA_FILE_NAME)
    with pytest.raises(UserError, match=r"is not an attention-processor LoRA"):
        read_lora(directory)


def test_training_from_an_original_checkpoint_starts_from_its_lora_with_a_new_optimizer(
    original_dir, preset, tmp_path, capsys
):
    from checkpoint_runs import read_metrics, run
    from safetensors.torch import load_file

    config = preset("tiny")
    config.pretrained.model, config.reward_fn = "tiny", "compressibility"  # the model `adapted` was made from
    config.prompt_fn = config.eval_prompt_fn = "eval_simple_animals"
    config.logdir, config.num_epochs, config.save_freq, config.vis_freq = str(tmp_path), 1, 0, 0
    config.train.learning_rate = 1e-9  # the LoRA barely moves: what training started from stays visible
    config.resume_from = str(original_dir)
    run_dir, _ = run(config)
    assert "is an original AlignProp checkpoint" in capsys.readouterr().out
    records = read_metrics(run_dir)
    assert records[0] == {"update": 0, "initialized_from_original": str(original_dir)}
    assert [r["update"] for r in records if "grad_norm" in r] == [1, 2]  # epoch 0 onwards, a fresh optimizer
    trained = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")
    started = read_lora(original_dir).tensors
    assert trained.keys() == started.keys()
    assert all(torch.allclose(trained[k], started[k], atol=1e-6) for k in started)
