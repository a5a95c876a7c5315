"""Train the toy world's flow-matching model (SD3-style MMDiT + two CLIP towers) and save the pipeline.

    python -m alignprop.toyworld.train_flow            # assets/toyworld/flow_pipeline (VAE: logs/toyworld/vae
                                                       # if built, else the shipped UNet pipeline's)

Stable Diffusion 3's recipe at toy scale (Esser et al. 2024, "Scaling Rectified Flow Transformers"): rendered scenes
are encoded once by the frozen toy VAE; with x_s = (1 - s) x0 + s noise, the transformer learns the velocity
noise - x0 (plain MSE), s drawn from the logit-normal(0, 1) density, the paper's best-ranked sampler ("rf/lognorm(0.00,
1.00)"), shifted by the scheduler's shift as diffusers' SD3 training scripts do (shift 1 here: none). The two
text encoders learn at the same time; captions are dropped (replaced by the empty prompt, the pipeline's negative)
10% of the time so classifier-free guidance works. An exponential moving average of the weights is what gets
saved, in fp16 (text encoders in fp32, see train_unet.py). The final check measures prompt control with the
project's sampler at guidance 1 and 5.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel
from tqdm.auto import tqdm
from transformers import CLIPTextModelWithProjection

from alignprop import models
from alignprop.toyworld import FLOW_PIPELINE_DIR, PIPELINE_DIR
from alignprop.toyworld.components import build_tokenizer
from alignprop.toyworld.components_flow import (
    SHIFT,
    T5_PADDING,
    TRANSFORMER,
    assemble_flow,
    build_text_encoder,
    build_transformer,
    collapse_padding,
    deepen,
    encode_ids,
    restore_attention,
)
from alignprop.toyworld.control import STEPS, all_captions, prompt_control
from alignprop.toyworld.data import (
    RunLog,
    denoiser_training_arguments,
    rendered_dataset,
    set_threads,
)
from alignprop.toyworld.train_unet import Optimization, encode_latents, token_ids
from alignprop.toyworld.world import SHAPES

CONTROL_SEED = 1234  # latents of the final prompt-control measurement (as train_unet.py)


def parse_args(argv=None):
    log = Path("logs/toyworld/flow/train_log.jsonl")
    parser = denoiser_training_arguments(__doc__, FLOW_PIPELINE_DIR, log, steps=3000, batch_size=64)
    parser.add_argument("--vae", type=Path, default=None, help="default: logs/toyworld/vae if built, else shipped")
    parser.add_argument("--layers", type=int, default=TRANSFORMER["layers"])
    parser.add_argument("--heads", type=int, default=TRANSFORMER["heads"])
    parser.add_argument("--head-dim", type=int, default=TRANSFORMER["head_dim"])
    parser.add_argument("--patch-size", type=int, default=TRANSFORMER["patch_size"])
    parser.add_argument("--shift", type=float, default=SHIFT, help="the schedule's shift (training and sampling)")
    parser.add_argument("--sigmas", choices=("lognorm", "uniform"), default="lognorm", help="noise-level density")
    parser.add_argument(
        "--padding",
        type=int,
        nargs=2,
        default=(1, T5_PADDING),
        metavar=("FEWEST", "MOST"),
        help="zero T5 tokens per sample: log-uniform integers in [FEWEST, MOST]",
    )
    parser.add_argument(
        "--shape-weights",
        type=float,
        nargs=len(SHAPES),
        default=(1.0,) * len(SHAPES),
        metavar=tuple(s.upper() for s in SHAPES),
        help="how often a scene of each shape is drawn, relative to the others (a late stage can favour the "
        "shape the model draws worst)",
    )
    parser.add_argument(
        "--init", type=Path, default=None, help="continue from this flow pipeline's transformer and text encoders"
    )
    parser.add_argument(
        "--add-layers",
        type=int,
        default=0,
        help="with --init: insert this many pass-through joint blocks before the last (components_flow.deepen)",
    )
    parser.add_argument("--control-guidance", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--control-steps", type=int, default=STEPS, help="sampling steps of the final check")
    parser.add_argument("--control-only", action="store_true", help="no training: measure the pipeline at --out")
    parser.add_argument("--control-tokens", type=int, default=0, help="T5 tokens of the check (0: the pipeline's 256)")
    args = parser.parse_args(argv)
    if args.add_layers and args.init is None:
        parser.error("--add-layers deepens a trained model: give it with --init")
    return args


def default_vae() -> Path:
    built = Path("logs/toyworld/vae")
    return built if (built / "config.json").exists() else PIPELINE_DIR / "vae"


def sample_sigmas(count: int, shift: float, generator: torch.Generator, density: str = "lognorm") -> torch.Tensor:
    """Noise levels from logit-normal(0, 1) or uniform, shifted as `FlowMatchEulerDiscreteScheduler` shifts its
    sigmas."""
    if density == "lognorm":
        sigmas = torch.sigmoid(torch.randn(count, generator=generator))
    else:
        sigmas = torch.rand(count, generator=generator)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_padding(count: int, fewest: int, most: int, generator: torch.Generator) -> torch.Tensor:
    """Zero T5 tokens per sample, log-uniform integers in [fewest, most]: the model then serves any
    `max_sequence_length` in that range (the count shifts the attention paid to the padding)."""
    low, high = math.log(fewest), math.log(most + 1)
    return torch.exp(low + torch.rand(count, generator=generator) * (high - low)).floor().clamp(fewest, most)


def shape_weights(data, weights) -> torch.Tensor:
    """Each scene's chance of being drawn, from its shape's weight (all 1: uniform over the scenes)."""
    of_shape = dict(zip(SHAPES, weights, strict=True))
    return torch.tensor([of_shape[scene.shape] for scene in data.scenes], dtype=torch.float64)


def draw_scenes(scene_weights: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of `count` scenes, drawn with replacement in proportion to `scene_weights`."""
    return torch.multinomial(scene_weights, count, replacement=True, generator=generator)


def initial_models(tokenizer, args):
    """Fresh transformer and text encoders, or (for a second stage) those of a saved flow pipeline, in float32."""
    if args.init is None:
        transformer = build_transformer(args.layers, args.heads, args.head_dim, args.patch_size)
        return transformer, torch.nn.ModuleList([build_text_encoder(tokenizer), build_text_encoder(tokenizer)])
    transformer = SD3Transformer2DModel.from_pretrained(args.init / "transformer", torch_dtype=torch.float32)
    transformer = deepen(transformer, args.add_layers) if args.add_layers else transformer
    encoders = [
        CLIPTextModelWithProjection.from_pretrained(args.init / name, dtype=torch.float32)
        for name in ("text_encoder", "text_encoder_2")
    ]
    if encoders[0].config.vocab_size != len(tokenizer):
        raise ValueError(f"{args.init} was trained with another vocabulary ({encoders[0].config.vocab_size} tokens)")
    return transformer.train(), torch.nn.ModuleList(encoders).train()


def train(args) -> dict:
    set_threads(args.threads)
    log = RunLog(args.log)
    device = torch.device(args.device)
    vae = AutoencoderKL.from_pretrained(args.vae or default_vae(), torch_dtype=torch.float32)
    vae = vae.requires_grad_(False).eval().to(device)
    data = rendered_dataset(args.train_images, args.seed)
    latents = encode_latents(vae, data.images.to(device))
    tokenizer = build_tokenizer(args.log.parent / "tokenizer_files")
    ids, empty = token_ids(tokenizer, data.captions).to(device), token_ids(tokenizer, [""]).to(device)
    log.write(prepared=len(data), latent_std=latents.std().item())

    scene_weights = shape_weights(data, args.shape_weights)
    torch.manual_seed(args.seed)
    transformer, text_encoders = initial_models(tokenizer, args)
    # The pipeline's zero "T5" tokens, collapsed into one (exact; see components_flow).
    padding = collapse_padding(transformer)
    modules = torch.nn.ModuleList([transformer, text_encoders]).to(device)
    log.write(parameters={"transformer": sum(p.numel() for p in transformer.parameters())})
    optimization = Optimization(modules, args, log)
    generator = torch.Generator().manual_seed(args.seed)
    for step in (progress := tqdm(range(1, args.steps + 1), desc="flow", mininterval=5)):
        # All randomness from one CPU generator, so the draws do not depend on the device.
        indices = draw_scenes(scene_weights, args.batch_size, generator).to(device)
        dropped = (torch.rand(args.batch_size, generator=generator) < args.caption_dropout).to(device)
        batch_ids = torch.where(dropped[:, None], empty, ids[indices])
        clean = latents[indices]
        noise = torch.randn(clean.shape, generator=generator).to(device)
        sigmas = sample_sigmas(args.batch_size, args.shift, generator, args.sigmas).to(device)
        padding.copies = sample_padding(args.batch_size, *args.padding, generator).to(device)
        noisy = (1 - sigmas[:, None, None, None]) * clean + sigmas[:, None, None, None] * noise
        context, pooled = encode_ids(text_encoders, batch_ids, padding=1)
        prediction = transformer(
            hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=context, pooled_projections=pooled
        ).sample
        loss = F.mse_loss(prediction, noise - clean)
        optimization.update(loss, step, progress)

    transformer, (text_encoder, text_encoder_2) = optimization.average
    restore_attention(transformer)
    pipeline = assemble_flow(vae, text_encoder, text_encoder_2, tokenizer, transformer, args.shift)
    pipeline = pipeline.to("cpu", torch.float16)
    # Stored in fp32 (exactly the fp16 values): stock diffusers loads its own components as float32 but a
    # transformers model in its stored dtype, and would then mix the two.
    pipeline.text_encoder.to(torch.float32)
    pipeline.text_encoder_2.to(torch.float32)
    pipeline.text_encoder_3.to(torch.float32)
    pipeline.save_pretrained(args.out)
    train_seconds = log.elapsed()
    control = measure(args)
    log.write(done=True, train_seconds=train_seconds, prompt_control=control)
    return control


def measure(args) -> dict:
    """Prompt control of what ships (the fp16 files, loaded by the project's loader) at each guidance scale:
    every caption `control_repeats` times, image i from latent i of CONTROL_SEED; with the seconds it took."""
    shipped = models.load_pipeline(str(args.out)).to(torch.device(args.device))
    prompts = all_captions() * args.control_repeats
    sampling = {"seed": CONTROL_SEED, "steps": args.control_steps, "tokens": args.control_tokens}
    results = {}
    for guidance in args.control_guidance:
        started = time.perf_counter()
        control = prompt_control(shipped, prompts, guidance=guidance, **sampling)
        results[f"guidance_{guidance:g}"] = control | {"seconds": round(time.perf_counter() - started, 1)}
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.control_only:
        set_threads(args.threads)
    print(json.dumps(measure(args) if args.control_only else train(args), indent=2))


if __name__ == "__main__":
    main()
