"""train.finetune="full": every denoiser weight trains; checkpoints, exact resume, EMA, the exported `RUN/unet/`
(loaded by diffusers' own `from_pretrained` into the stock pipeline), evaluation, soup, the hub folder, refusals."""

import json
from dataclasses import replace

import pytest
import torch
from checkpoint_runs import read_metrics, run, straight_and_resumed, tiny_config
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from small_runs import EVAL_PROMPTS, SmoothReward, make_trainer, small_config

from alignprop import checkpoint, hub, jobs
from alignprop.denoiser_files import is_denoiser_folder
from alignprop.errors import UserError
from alignprop.models import resolve_model_source
from alignprop.reference import reference_sample
from alignprop.sampling import decode
from alignprop.soup import DenoiserSoup, SoupInputs, read_source

WEIGHTS = "diffusion_pytorch_model.safetensors"
MODEL = "toyworld"  # the tiny preset's model
VOLATILE = {"seconds"}


def full_config(preset, logdir, **overrides):
    """The tiny preset, every UNet weight trained, 4 DDIM steps, 2 updates per epoch, 2 evaluation captions, an EMA."""
    prompts = logdir.parent / f"{logdir.name}_eval_prompts.txt"  # beside logdir: a refused run leaves logdir empty
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("\n".join(EVAL_PROMPTS) + "\n")
    config = tiny_config(preset, logdir, eval_prompt_fn=str(prompts), steps=4, save_freq=1, **overrides)
    config.truncated_backprop_minmax, config.trunc_backprop_timestep = (0, 4), 3
    config.train.update(finetune="full", ema_decay=0.9, learning_rate=1e-4)
    config.train.update(total_samples_per_epoch=4, total_batch_size=2, batch_size_per_gpu_available=2)
    return config


@pytest.fixture(scope="module")
def runs(preset, tmp_path_factory):
    """Two epochs straight; one epoch, then a resume from it up to two; the evaluate mode on the straight run."""
    logdir = tmp_path_factory.mktemp("full")
    runs = straight_and_resumed(lambda *args, **overrides: full_config(preset, *args, **overrides), logdir)
    return {**runs, "logdir": logdir}


def training_records(run_dir):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run_dir) if "loss" in r]


def test_a_full_checkpoint_holds_the_whole_unet_and_its_average(runs):
    saved = checkpoint.resolve(str(runs["straight"]))
    assert (saved.epoch, saved.finetune, saved.denoiser_name) == (2, "full", "unet")
    assert is_denoiser_folder(saved.path / "unet") and is_denoiser_folder(saved.path / "ema" / "unet")
    assert not (saved.path / "pytorch_lora_weights.safetensors").exists()
    base = UNet2DConditionModel.from_pretrained(resolve_model_source(MODEL), subfolder="unet")
    state = saved.training_state()
    assert state["trainable"] == [name for name, _ in base.named_parameters()], "every UNet weight, in order"
    raw, averaged = load_file(saved.path / "unet" / WEIGHTS), load_file(saved.path / "ema" / "unet" / WEIGHTS)
    assert all(tensor.dtype == torch.float32 for tensor in raw.values()), "fp32 master weights"
    moved = [key for key, tensor in base.state_dict().items() if not torch.equal(tensor, raw[key])]
    assert len(moved) > 0.9 * len(raw), "full fine-tuning moves (almost) every weight"
    assert any(not torch.equal(raw[key], averaged[key]) for key in moved), "the average lags the raw weights"


def test_full_run_resumes_bit_for_bit(runs):
    straight, first, second = runs["straight"], runs["first"], runs["second"]
    for name in ("checkpoints/checkpoint_2/unet", "checkpoints/checkpoint_2/ema/unet", "unet"):
        expected, got = load_file(straight / name / WEIGHTS), load_file(second / name / WEIGHTS)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), name
    assert training_records(first) + training_records(second) == training_records(straight)
    expected = torch.load(straight / "checkpoints/checkpoint_2" / checkpoint.STATE_FILE, weights_only=True)
    got = torch.load(second / "checkpoints/checkpoint_2" / checkpoint.STATE_FILE, weights_only=True)
    for index, values in expected["optimizer"]["state"].items():
        assert all(torch.equal(values[k], got["optimizer"]["state"][index][k]) for k in values)


def test_the_final_unet_is_the_average_and_evaluating_the_run_uses_it(runs):
    straight = runs["straight"]
    final = load_file(straight / "unet" / WEIGHTS)
    averaged = load_file(straight / "checkpoints/checkpoint_2/ema/unet" / WEIGHTS)
    assert all(torch.equal(final[key], averaged[key]) for key in final)
    _, result = runs["evaluate"]
    last_evaluation = [r for r in read_metrics(straight) if r.get("eval")][-1]
    assert result.summary()["reward_mean"] == pytest.approx(last_evaluation["reward_mean"], abs=1e-6)
    assert checkpoint.resolve_weights(str(straight)) == straight / "checkpoints/checkpoint_2/ema/unet"


def test_stock_diffusers_samples_our_evaluation_images_with_the_exported_unet(preset, runs):
    """`UNet2DConditionModel.from_pretrained(RUN/unet)` in a stock StableDiffusionPipeline, our latents: the images of
    our evaluate mode on the same folder."""
    folder = str(runs["straight"] / "unet")
    run_dir, ours = run(full_config(preset, runs["logdir"], run_name="folder", only_eval=True, resume_from=folder))
    config = preset("tiny")
    unet = UNet2DConditionModel.from_pretrained(runs["straight"] / "unet")
    pipeline = StableDiffusionPipeline.from_pretrained(
        resolve_model_source(MODEL), unet=unet, safety_checker=None, requires_safety_checker=False
    )
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    latents = torch.randn((len(ours.prompts), 4, 8, 8), generator=torch.Generator().manual_seed(config.seed))
    theirs = pipeline(
        ours.prompts, latents=latents, num_inference_steps=4, guidance_scale=config.sd_guidance_scale,
        eta=config.eta, output_type="pt",
    ).images  # fmt: skip
    assert (theirs - (ours.images + 1) / 2).abs().max() <= 1e-5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["lora"] == folder


def test_full_fine_tuning_gradients_equal_the_naive_loop_in_float64(preset, tmp_path):
    """One update's gradient of every UNet weight (our sampler, the trainer's loss) against the original's plain
    sampling loop (`reference_sample`) on the same prompts, latents and truncation plan."""
    config = small_config(preset, tmp_path, **{"train.finetune": "full", "eta": 0.0})
    trainer = make_trainer(config)
    trainer.model.pipeline.to(torch.float64)
    trainer.reward = SmoothReward()
    draw = trainer.draw_micro_batch
    trainer.draw_micro_batch = lambda: (lambda batch: replace(batch, latents=batch.latents.double()))(draw())
    captured = {}
    trainer.synchronize_gradients = lambda: captured.update(grads=[p.grad.clone() for p in trainer.params])
    streams = trainer.random.state_dict()
    batch = trainer.draw_micro_batch()
    trainer.random.load_state_dict(streams)
    weights = [p.detach().clone() for p in trainer.params]
    trainer.train_update()
    assert batch.plan.trained_steps(), "the plan keeps a step with gradient"

    with torch.no_grad():
        for param, saved in zip(trainer.params, weights):
            param.copy_(saved)
    trainer.optimizer.zero_grad(set_to_none=True)
    model = trainer.model
    conditioning = model.conditioning(batch.prompts, guided=True)
    final = reference_sample(model, conditioning, batch.latents, batch.plan.trained, config.sd_guidance_scale)
    loss = (decode(model, final) - 0.3).square().mean(dim=(1, 2, 3)).mean() * config.train.loss_coeff
    loss.backward()
    assert len(trainer.params) == len(list(model.denoiser.parameters()))
    nonzero = 0
    for ours, param in zip(captured["grads"], trainer.params):
        naive = param.grad if param.grad is not None else torch.zeros_like(param)
        assert (ours - naive).norm() <= 1e-5 * naive.norm() + 1e-30
        nonzero += bool(naive.norm() > 0)
    assert nonzero > 0.9 * len(trainer.params)


def test_a_full_update_leaves_the_text_encoder_and_vae_alone(preset, tmp_path):
    trainer = make_trainer(small_config(preset, tmp_path, **{"train.finetune": "full"}))
    frozen = {
        f"{name}.{key}": tensor.clone()
        for name, module in (("vae", trainer.model.vae), ("text", trainer.model.pipeline.text_encoder))
        for key, tensor in module.state_dict().items()
    }
    trainer.train_update()
    now = {**{f"vae.{k}": t for k, t in trainer.model.vae.state_dict().items()}}
    now |= {f"text.{k}": t for k, t in trainer.model.pipeline.text_encoder.state_dict().items()}
    assert all(torch.equal(frozen[key], now[key]) for key in frozen)
    assert all(param.dtype == torch.float32 and param.requires_grad for param in trainer.denoiser.parameters())
    assert not any(param.requires_grad for param in trainer.reward.parameters())


def test_soup_mixes_every_weight_of_two_full_runs_linearly(runs):
    a = read_source(str(runs["straight"]), "resume_from")
    b = read_source(str(runs["first"] / "unet"), "resume_from_2")
    base = UNet2DConditionModel.from_pretrained(resolve_model_source(MODEL), subfolder="unet").state_dict()
    for inputs, other in ((SoupInputs(a, b, "params", (0.25,)), b.tensors), (SoupInputs(a, None, "delta", ()), base)):
        unet = UNet2DConditionModel.from_pretrained(resolve_model_source(MODEL), subfolder="unet")
        soup = DenoiserSoup(unet, inputs)
        soup.set_coefficient(0.25)
        mixed = unet.state_dict()
        for key, tensor in a.tensors.items():
            assert torch.allclose(mixed[key], 0.25 * tensor + 0.75 * other[key], atol=1e-7)


def test_soup_run_of_a_full_run_against_the_base_model(preset, runs):
    """Coefficient 1: the run's evaluation; 0: the base model's."""
    config = full_config(preset, runs["logdir"], run_name="soup", soup_inference=True)
    config.update(resume_from=str(runs["straight"]), resume_from_2="stablediffusion", soup_sweep=(0.0, 1.0))
    _, rows = run(config)
    base = run(full_config(preset, runs["logdir"], run_name="base", only_eval=True, resume_from="stablediffusion"))[1]
    by_coefficient = {row["coefficient"]: row["reward_mean"] for row in rows}
    assert by_coefficient[1.0] == pytest.approx(runs["evaluate"][1].summary()["reward_mean"], abs=1e-6)
    assert by_coefficient[0.0] == pytest.approx(base.summary()["reward_mean"], abs=1e-6)


def test_the_hub_folder_of_a_full_run_holds_the_unet_and_says_how_to_load_it(preset, runs):
    config = full_config(preset, runs["logdir"])
    folder = hub.write_folder(config, "tiny", runs["straight"], 4, {}, {})
    assert is_denoiser_folder(folder / "unet")
    card = (folder / "README.md").read_text()
    assert 'UNet2DConditionModel.from_pretrained(folder, subfolder="unet"' in card
    assert "load_lora_weights" not in card and "- lora" not in card


def assert_refused(config, logdir, words: str) -> None:
    """One line containing `words`, and no run directory under `logdir`."""
    with pytest.raises(UserError) as error:
        jobs.run_job(config)
    assert words in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not logdir.exists() or not any(logdir.iterdir())


@pytest.mark.parametrize(
    "overrides, words",
    [({"train.finetune": "partial"}, "train.finetune"), ({"native_dtype": True}, "drop native_dtype")],
)
def test_settings_full_fine_tuning_cannot_take_are_refused(preset, tmp_path, overrides, words):
    config = full_config(preset, tmp_path / "logs")
    key, value = next(iter(overrides.items()))
    (config.train if key.startswith("train.") else config)[key.removeprefix("train.")] = value
    assert_refused(config, tmp_path / "logs", words)


def test_a_full_checkpoint_resumes_only_as_full_fine_tuning(preset, runs, tmp_path):
    config = full_config(preset, tmp_path / "logs", num_epochs=4, resume_from=str(runs["straight"]))
    config.train.finetune = "lora"
    assert_refused(config, tmp_path / "logs", "was trained with train.finetune='full', this config has 'lora'")


def test_evaluating_a_folder_of_another_model_class_is_refused(preset, tmp_path):
    vae = tmp_path / "vae"
    AutoencoderKL.from_pretrained(resolve_model_source(MODEL), subfolder="vae").save_pretrained(vae)
    config = full_config(preset, tmp_path / "logs", only_eval=True, resume_from=str(vae))
    assert_refused(config, tmp_path / "logs", "holds a AutoencoderKL; this model's denoiser is a UNet2DConditionModel")


def test_a_soup_of_a_lora_and_a_full_run_is_refused(preset, runs, tmp_path):
    (tmp_path / "lora").mkdir()
    lora_run = make_trainer(small_config(preset, tmp_path / "lora"))
    lora_run.trainable.export(tmp_path / "lora")
    config = full_config(preset, tmp_path / "logs", soup_inference=True, resume_from=str(runs["straight"]))
    config.resume_from_2 = str(tmp_path / "lora" / "lora")
    assert_refused(config, tmp_path / "logs", "a soup mixes two of a kind")
