"""A quantized frozen base (pretrained.quantize): gradients through int8 weights, runs, and what cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import cli_runner
import pytest
import torch
from checkpoint_runs import read_metrics, run, straight_and_resumed, tiny_config
from gradient_checks import PROMPTS, lora_params, relative_errors
from safetensors.torch import load_file
from small_runs import assert_one_line_before_the_run_directory, small_config
from test_interop import stock_pipeline
from torchao.utils import TorchAOBaseTensor

from alignprop import models
from alignprop.lora import add_lora
from alignprop.lora_files import LORA_FILE_NAME
from alignprop.models import resolve_model_source
from alignprop.quantization import is_quantized
from alignprop.sampling import SamplingOptions, decode, initial_latents, sample

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
INT8 = ("int8", "none")


def quantized_linears(module: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {
        name: layer
        for name, layer in module.named_modules()
        if isinstance(layer, torch.nn.Linear) and isinstance(layer.weight, TorchAOBaseTensor)
    }


def with_nonzero_lora(model, seed: int = 1):
    """The model with a LoRA whose B factors are non-zero and seeded (so every factor gets gradient)."""
    add_lora(model.denoiser, rank=4, alpha=4, target_modules=TARGETS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(lora_params(model.denoiser).items()):
            param.copy_(torch.randn(param.shape, generator=generator) * (0.05 if "lora_B" in name else 0.5))
    return model


def dequantized_copy(name: str, quantized) -> object:
    """The same model unquantized in fp32, every quantized Linear's weight replaced by its dequantized int8 values:
    the computation the quantized model should differentiate exactly."""
    reference = models.load_model(name)
    layers = dict(reference.denoiser.named_modules())
    with torch.no_grad():
        for layer_name, layer in quantized_linears(quantized.denoiser).items():
            layers[layer_name].weight.copy_(layer.weight.dequantize().float())
    return reference


def chain_grads(model) -> dict[str, torch.Tensor]:
    """LoRA gradients of a smooth image loss through 3 sampler steps with gradient (guided), fp32."""
    for param in lora_params(model.denoiser).values():
        param.grad = None
    latents = initial_latents(2, model, torch.Generator().manual_seed(0))
    final = sample(model, model.encode(PROMPTS), latents, [True] * 3, SamplingOptions(3, 5.0))
    (decode(model, final) - 0.3).square().mean().backward()
    return {name: param.grad.clone() for name, param in lora_params(model.denoiser).items()}


@pytest.mark.parametrize("name", ["tiny", "tiny_sd3"])
def test_lora_gradients_through_int8_weights_equal_those_through_their_dequantized_values(name):
    quantized = models.load_model(name, quantize=INT8)
    linears = quantized_linears(quantized.denoiser)
    assert is_quantized(quantized.denoiser) and len(linears) >= 8, "the denoiser's Linear layers hold int8 weights"
    assert not quantized_linears(quantized.pipeline.text_encoder), "quantize_text_encoders=none leaves them alone"
    reference = dequantized_copy(name, quantized)
    original = models.load_model(name)
    some = next(iter(linears))
    rounding = (
        dict(original.denoiser.named_modules())[some].weight - dict(reference.denoiser.named_modules())[some].weight
    )
    assert rounding.abs().max() > 0, "the reference holds the int8-rounded weights, not the original ones"

    ours = chain_grads(with_nonzero_lora(quantized))
    theirs = chain_grads(with_nonzero_lora(reference))
    assert ours.keys() == theirs.keys() and len(ours) >= 16
    assert max(relative_errors(ours, theirs).values()) <= 1e-4
    assert all(grad.abs().sum() > 0 for grad in ours.values())
    assert {type(layer).__name__ for layer in quantized.denoiser.modules() if hasattr(layer, "lora_A")} == {
        "TorchaoLoraLinear"
    }, "peft wraps the int8 layers in its torchao LoRA class"


def test_quantize_text_encoders_quantizes_every_text_encoder_and_only_those():
    model = models.load_model("tiny_sd3", quantize=("none", "int8"))
    assert not quantized_linears(model.denoiser)
    for name in model.text_encoder_names:
        assert quantized_linears(getattr(model.pipeline, name)), name
    encoded = model.encode(PROMPTS).cond
    plain = models.load_model("tiny_sd3").encode(PROMPTS).cond
    for key, value in plain.items():  # measured: 0.9% and 1.7% of the largest value (prompt states, pooled)
        assert (encoded[key] - value).abs().max() <= 0.05 * value.abs().max(), "int8 text encoders: nearly the same"
        assert not torch.equal(encoded[key], value)


def int8_config(preset, logdir, **overrides):
    """The tiny preset on an int8 base: 4 DDIM steps, 2 updates per epoch, a checkpoint every epoch."""
    config = tiny_config(preset, logdir, steps=4, save_freq=1, **overrides)
    config.truncated_backprop_minmax, config.trunc_backprop_timestep = (0, 4), 3
    config.train.update(total_samples_per_epoch=4, total_batch_size=2, batch_size_per_gpu_available=2)
    config.pretrained.quantize = "int8"
    return config


@pytest.fixture(scope="module")
def runs(preset, tmp_path_factory):
    """Two epochs straight; one, then resumed up to two; the evaluate mode on the straight run; a soup sweep of the
    straight run against the base (all on the int8 base)."""
    logdir = tmp_path_factory.mktemp("int8")
    runs = straight_and_resumed(lambda *args, **overrides: int8_config(preset, *args, **overrides), logdir)
    soup_config = int8_config(
        preset,
        logdir,
        run_name="soup",
        soup_inference=True,
        resume_from=str(runs["straight"]),
        resume_from_2="stablediffusion",
        soup_sweep=(1, 0),
    )
    return {**runs, "soup": run(soup_config)[0]}


def lora_tensors(run_dir):
    return load_file(run_dir / "lora" / LORA_FILE_NAME)


def test_an_int8_base_run_trains_and_resumes_bit_for_bit(runs):
    straight, second = lora_tensors(runs["straight"]), lora_tensors(runs["second"])
    assert straight.keys() == second.keys() and all(torch.equal(straight[k], second[k]) for k in straight)
    assert all(tensor.dtype == torch.float32 for tensor in straight.values()), "the LoRA trains in fp32"
    assert any(tensor.abs().sum() > 0 for key, tensor in straight.items() if "lora_B" in key or "lora.up" in key)
    records = lambda run_dir: [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run_dir)]  # noqa: E731
    train = lambda run_dir: [r for r in records(run_dir) if "loss" in r]  # noqa: E731
    assert train(runs["first"]) + train(runs["second"]) == train(runs["straight"])


def test_evaluate_and_soup_on_the_int8_base_reproduce_the_run(runs):
    _, evaluated = runs["evaluate"]
    final = [r for r in read_metrics(runs["straight"]) if r.get("eval")][-1]
    before = [r for r in read_metrics(runs["straight"]) if r.get("eval")][0]
    assert evaluated.summary()["reward_mean"] == pytest.approx(final["reward_mean"], abs=1e-6)
    rows = {row["coefficient"]: row for row in json.loads((runs["soup"] / "soup.json").read_text())["rows"]}
    assert rows[1.0]["reward_mean"] == pytest.approx(final["reward_mean"], abs=1e-5)
    assert rows[0.0]["reward_mean"] == pytest.approx(before["reward_mean"], abs=1e-5)


def test_the_lora_of_an_int8_run_samples_in_the_unquantized_stock_pipeline(preset, runs):
    """The saved LoRA is the usual diffusers file: the stock fp32 pipeline loads it and samples what the quantized
    run evaluated, up to the int8 rounding of the base weights."""
    _, ours = runs["evaluate"]
    config = preset("tiny")
    pipeline = stock_pipeline(resolve_model_source(config.pretrained.model), str(runs["straight"] / "lora"))
    latents = torch.randn((len(ours.prompts), 4, 8, 8), generator=torch.Generator().manual_seed(config.seed))
    theirs = pipeline(
        ours.prompts,
        latents=latents,
        num_inference_steps=4,
        guidance_scale=config.sd_guidance_scale,
        eta=config.eta,
        output_type="pt",
    ).images
    difference = (theirs - (ours.images + 1) / 2).abs()
    # Measured on the toy world's 32 x 32 images: mean 0.0003, max 0.018 of the [0, 1] range (5 x margin).
    assert difference.mean() <= 0.0015 and difference.max() <= 0.09
    assert difference.max() > 0, "the stock pipeline's base is unquantized: some rounding shows"


REFUSED = [
    ({"pretrained.quantize": "int8", "train.finetune": "full"}, "quantized weights cannot train"),
    ({"pretrained.quantize": "int8", "sharding": "fsdp"}, "FSDP does not shard quantized weights"),
    ({"pretrained.quantize": "nf4"}, "bitsandbytes' NF4 runs on CUDA GPUs only"),
    ({"pretrained.quantize_text_encoders": "nf4"}, "bitsandbytes' NF4 runs on CUDA GPUs only"),
    ({"pretrained.quantize": "int4"}, "pretrained.quantize"),
    (
        {"pretrained.quantize_text_encoders": "int8", "pretrained.model": "/x/model.safetensors"},
        "quantize_text_encoders with a single-file model",
    ),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="NF4 is refused only where no CUDA GPU is")
@pytest.mark.parametrize("overrides, words", REFUSED, ids=[words.split()[0] for _, words in REFUSED])
def test_what_a_quantized_base_cannot_run_is_one_line_before_anything_is_written(preset, tmp_path, overrides, words):
    assert_one_line_before_the_run_directory(small_config(preset, tmp_path, **overrides), tmp_path, words)


def test_the_command_line_refuses_int8_with_full_fine_tuning_in_one_line(tmp_path):
    arguments = [
        "--config.pretrained.quantize=int8",
        "--config.train.finetune=full",
        f"--config.logdir={tmp_path}/logs",
    ]
    result = cli_runner.run([ROOT / "main.py", "--config", "config/align_prop.py:tiny", *arguments], cwd=ROOT)
    assert result.returncode == 2 and result.stderr.strip().startswith("error:"), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "quantized weights cannot train" in result.stderr
    assert not (tmp_path / "logs").exists()


def test_the_dry_run_says_what_is_quantized_at_load(tmp_path):
    arguments = ["--config.pretrained.quantize=int8", "--config.pretrained.quantize_text_encoders=fp8"]
    result = cli_runner.run(
        [ROOT / "main.py", "--config", "config/align_prop.py:tiny", "--config.dry_run=True", *arguments]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "quantized at load: denoiser: int8 weight-only (torchao); text encoders: float8 e4m3" in result.stdout


@pytest.mark.parametrize("name, tiny_model", [("hps_sdxl_24gb", "tiny_sdxl"), ("hps_flux_24gb", "tiny_flux")])
def test_the_24gb_presets_train_on_their_family_with_an_int8_base(preset, tmp_path, name, tiny_model):
    """Each one-GPU preset as shipped (int8 base, K=1, one sample per pass, checkpointing, text encoders offloaded),
    on its family's tiny model with an offline reward and a few steps: the LoRA trains and loads back."""
    config = preset(name)
    assert config.pretrained.quantize == "int8" and config.train.batch_size_per_gpu_available == 1
    assert config.block_checkpoint and config.decode_checkpoint and config.offload_text_encoders
    assert (config.truncation_strategy, config.trunc_backprop_timestep) == ("fixed", config.steps - 1), "K=1"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    config.update(logdir=str(tmp_path / "logs"), run_name="run", reward_fn="colorfulness", mixed_precision="no")
    config.update(prompt_fn=str(prompts), eval_prompt_fn=str(prompts), steps=4, resolution=None, num_epochs=1)
    config.truncated_backprop_minmax, config.trunc_backprop_timestep = (0, 4), 3
    config.pretrained.model = tiny_model
    config.train.update(total_samples_per_epoch=2, total_batch_size=2)
    run_dir, _ = run(config)
    tensors = lora_tensors(run_dir)
    assert tensors and any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k or "lora.up" in k)
