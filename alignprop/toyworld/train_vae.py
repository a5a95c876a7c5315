"""Train the toy world's VAE (AutoencoderKL, 32x32x3 <-> 8x8x4) on rendered scenes.

    python -m alignprop.toyworld.train_vae --out logs/toyworld/vae

Reconstruction (L1 + MSE) plus a tiny KL term, as Stable Diffusion's autoencoder; at the end the latent
scaling factor is set so that scaled latents have unit standard deviation, as SD's 0.18215 does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignprop.toyworld.components import build_vae
from alignprop.toyworld.data import RunLog, cosine_schedule, psnr, rendered_dataset, set_threads

KL_WEIGHT = 1e-6  # on the per-image KL sum, as SD's autoencoder: keeps latents bounded, barely regularised


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("logs/toyworld/vae"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-images", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-every", type=int, default=100)
    return parser.parse_args(argv)


def vae_loss(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample
    rec = (reconstruction - images).abs().mean() + (reconstruction - images).pow(2).mean()
    return rec + KL_WEIGHT * posterior.kl().mean(), reconstruction


@torch.no_grad()
def validation_psnr(vae, images: torch.Tensor) -> float:
    reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample
    return psnr(reconstruction, images)


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor, batch_size: int = 256) -> float:
    """1 / std of the latent means, so that the diffusion model sees unit-variance latents."""
    chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in chunks])
    return 1.0 / latents.std().item()


def train(args) -> None:
    set_threads(args.threads)
    log = RunLog(args.out / "train_log.jsonl")
    data = rendered_dataset(args.train_images, args.seed)
    validation = rendered_dataset(512, args.seed + 1000).images.to(args.device)
    torch.manual_seed(args.seed)
    vae = build_vae().to(args.device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, args.steps, warmup_steps=50)
    batches = torch.Generator().manual_seed(args.seed)
    for step in (progress := tqdm(range(1, args.steps + 1), desc="vae", mininterval=5)):
        indices = torch.randint(len(data), (args.batch_size,), generator=batches)
        loss, _ = vae_loss(vae, data.images[indices].to(args.device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            vae.eval()
            quality = validation_psnr(vae, validation)
            vae.train()
            progress.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{quality:.1f}")
            log.write(step=step, loss=loss.item(), val_psnr=quality)
    vae.eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, data.images[:4096].to(args.device)))
    vae.save_pretrained(args.out)
    log.write(done=True, val_psnr=validation_psnr(vae, validation), scaling_factor=vae.config.scaling_factor)


def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
