"""Train the toy world's UNet and text encoder together, then assemble and save the pipeline.

    python -m alignprop.toyworld.train_vae            # first: logs/toyworld/vae
    python -m alignprop.toyworld.train_unet           # then: assets/toyworld/pipeline

Stable Diffusion's recipe at toy scale: rendered scenes are encoded once by the (frozen) VAE; the UNet
learns to predict the noise added to the scaled latents at a random timestep of SD 1.5's schedule,
conditioned on the caption's text embedding, which the text encoder learns at the same time. Captions
are dropped (replaced by the empty prompt) 10% of the time so classifier-free guidance works. An
exponential moving average of the weights is what gets saved, in fp16.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from alignprop import models
from alignprop.toyworld import PIPELINE_DIR
from alignprop.toyworld.components import assemble, build_text_encoder, build_tokenizer, build_unet, training_scheduler
from alignprop.toyworld.control import all_captions, prompt_control
from alignprop.toyworld.data import (
    RunLog,
    cosine_schedule,
    denoiser_training_arguments,
    rendered_dataset,
    set_threads,
)

MIN_SNR_GAMMA = 5.0  # Min-SNR loss weighting (Hang et al. 2023): faster convergence than plain MSE
CONTROL_SEED = 1234  # latents of the final prompt-control measurement


def parse_args(argv=None):
    log = Path("logs/toyworld/unet/train_log.jsonl")
    parser = denoiser_training_arguments(__doc__, PIPELINE_DIR, log, steps=2400, batch_size=128)
    parser.add_argument("--vae", type=Path, default=Path("logs/toyworld/vae"))
    parser.add_argument(
        "--init", type=Path, default=None, help="continue from this pipeline's UNet and text encoder (a second stage)"
    )
    return parser.parse_args(argv)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Scaled latent means, as the UNet sees them."""
    chunks = [vae.encode(images[i : i + batch_size]).latent_dist.mode() for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) * vae.config.scaling_factor


def token_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def min_snr_weights(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=MIN_SNR_GAMMA) / snr


class EMA:
    """Exponential moving average of a module's weights, with the usual warm-up of the decay."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.average = copy.deepcopy(module).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for average, current in zip(self.average.parameters(), module.parameters()):
            average.lerp_(current, 1 - decay)


class Optimization:
    """The update both denoiser trainings make: AdamW, linear warm-up then cosine decay, gradients clipped at norm 1,
    an EMA of the weights (`average`: what gets saved), and the loss logged every 100 steps."""

    def __init__(self, modules: torch.nn.Module, args, log: RunLog):
        self.modules, self.log, self.total_steps = modules, log, args.steps
        self.ema = EMA(modules, args.ema_decay)
        self.optimizer = torch.optim.AdamW(modules.parameters(), lr=args.lr, weight_decay=1e-2)
        self.schedule = cosine_schedule(self.optimizer, args.steps, warmup_steps=100)

    @property
    def average(self) -> torch.nn.Module:
        return self.ema.average

    def update(self, loss: torch.Tensor, step: int, progress) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.modules.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.ema.update(self.modules, step)
        if step % 100 == 0 or step == self.total_steps:
            progress.set_postfix(loss=f"{loss.item():.4f}")
            self.log.write(step=step, loss=loss.item(), lr=self.schedule.get_last_lr()[0])


def initial_models(tokenizer, init: Path | None):
    """Fresh UNet and text encoder, or (for a second stage) those of a saved pipeline, in float32."""
    if init is None:
        return build_unet(), build_text_encoder(tokenizer)
    unet = UNet2DConditionModel.from_pretrained(init / "unet", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(init / "text_encoder", dtype=torch.float32)
    if text_encoder.config.vocab_size != len(tokenizer):
        raise ValueError(f"{init} was trained with another vocabulary ({text_encoder.config.vocab_size} tokens)")
    return unet.train(), text_encoder.train()


def train(args) -> dict:
    set_threads(args.threads)
    log = RunLog(args.log)
    device = torch.device(args.device)
    vae = AutoencoderKL.from_pretrained(args.vae).requires_grad_(False).eval().to(device)
    data = rendered_dataset(args.train_images, args.seed)
    latents = encode_latents(vae, data.images.to(device))
    tokenizer = build_tokenizer(args.log.parent / "tokenizer_files")
    ids, empty = token_ids(tokenizer, data.captions).to(device), token_ids(tokenizer, [""]).to(device)
    log.write(prepared=len(data), latent_std=latents.std().item())

    torch.manual_seed(args.seed)
    unet, text_encoder = initial_models(tokenizer, args.init)
    modules = torch.nn.ModuleList([unet, text_encoder]).to(device)
    optimization = Optimization(modules, args, log)
    scheduler = training_scheduler()
    generator = torch.Generator().manual_seed(args.seed)
    for step in (progress := tqdm(range(1, args.steps + 1), desc="unet", mininterval=5)):
        # All randomness from one CPU generator, so the draws do not depend on the device.
        indices = torch.randint(len(data), (args.batch_size,), generator=generator).to(device)
        dropped = (torch.rand(args.batch_size, generator=generator) < args.caption_dropout).to(device)
        batch_ids = torch.where(dropped[:, None], empty, ids[indices])
        noise = torch.randn(latents[indices].shape, generator=generator).to(device)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        weights = min_snr_weights(scheduler, timesteps).to(device)
        timesteps = timesteps.to(device)
        noisy = scheduler.add_noise(latents[indices], noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(batch_ids).last_hidden_state).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weights).mean()
        optimization.update(loss, step, progress)

    unet, text_encoder = optimization.average
    pipeline = assemble(vae, text_encoder, tokenizer, unet).to("cpu", torch.float16)
    # Stored in fp32 (exactly the fp16 values): stock diffusers loads its own components as float32 but a
    # transformers model in its stored dtype, and would then mix the two.
    pipeline.text_encoder.to(torch.float32)
    pipeline.save_pretrained(args.out)
    # Measure what ships: the fp16 files, loaded by the project's loader.
    shipped = models.load_pipeline(str(args.out)).to(device)
    control = prompt_control(shipped, all_captions() * args.control_repeats, seed=CONTROL_SEED)
    log.write(done=True, train_seconds=log.elapsed(), prompt_control=control)
    return control


def main(argv=None) -> None:
    print(json.dumps(train(parse_args(argv)), indent=2))


if __name__ == "__main__":
    main()
