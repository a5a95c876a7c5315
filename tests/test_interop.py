"""A checkpoint loads into a stock diffusers StableDiffusionPipeline and reproduces our evaluate images."""

import json

import numpy as np
import torch
from checkpoint_runs import evaluated_run, straight_run
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from alignprop import checkpoint
from alignprop.models import resolve_model_source


def stock_pipeline(model_dir, checkpoint_dir):
    """What the README tells users to do, on the tiny preset's model instead of Stable Diffusion 1.5."""
    pipeline = StableDiffusionPipeline.from_pretrained(
        model_dir, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.load_lora_weights(checkpoint_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_stock_diffusers_reproduces_our_evaluate_images(preset, tmp_path_factory):
    run_dir, ours = evaluated_run(preset, tmp_path_factory)
    config = preset("tiny")
    checkpoint_dir = checkpoint.resolve(str(straight_run(preset, tmp_path_factory))).path
    pipeline = stock_pipeline(resolve_model_source(config.pretrained.model), str(checkpoint_dir))

    # Our evaluation latents: one CPU generator seeded with `seed`, drawn for all prompts at once.
    latents = torch.randn((len(ours.prompts), 4, 8, 8), generator=torch.Generator().manual_seed(config.seed))
    batch = config.train.batch_size_per_gpu_available  # the evaluation's batch size
    theirs = torch.cat(
        [
            pipeline(
                ours.prompts[start : start + batch],
                latents=latents[start : start + batch],
                num_inference_steps=config.steps,
                guidance_scale=config.sd_guidance_scale,
                eta=config.eta,
                output_type="pt",
            ).images
            for start in range(0, len(ours.prompts), batch)
        ]
    )
    # Same weights, latents and DDIM/CFG arithmetic: equal up to float rounding ([0, 1] scale).
    assert torch.allclose(theirs, (ours.images + 1) / 2, atol=1e-5)
    # And the PNGs we wrote are what diffusers' own post-processing gives, pixel for pixel.
    summary = json.loads((run_dir / "summary.json").read_text())
    written = np.stack([np.asarray(Image.open(run_dir / image["file"])) for image in summary["images"]])
    stock = (theirs.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.abs(written.astype(int) - stock.astype(int)).max() <= 1
