"""A tiny, deterministic, random-weight Stable Diffusion for tests and benchmarks (pretrained.model="tiny").

The CPU demo uses the *trained* toy-world model instead ("toyworld", assets/toyworld). Every component is
the real diffusers/transformers class, built from a small config with a fixed seed, written to disk with
`save_pretrained` and then loaded by `alignprop.models.load_pipeline` exactly like a downloaded checkpoint.
No network is touched.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import PartialState
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from alignprop.cache import cache_root
from alignprop.toyworld import components
from alignprop.toyworld.vocab import bytes_to_unicode
from alignprop.written_files import give_normal_mode

# Bump when anything below changes so stale caches are rebuilt, never reused.
TINY_VERSION = "tiny-sd-v1"
SEED = 0
LATENT_SIZE = 8  # 8x8x4 latents -> 32x32 RGB images (the VAE downsamples by 4)


def write_tokenizer_files(directory: Path) -> None:
    """A character-level CLIP vocabulary: every byte, alone and word-final, plus the special tokens.

    With no merges every word splits into characters, so any prompt tokenizes.
    """
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")


def build_tokenizer(directory: Path) -> CLIPTokenizer:
    write_tokenizer_files(directory)
    # transformers 5 ignores vocab_file= in the constructor; from_pretrained(dir) reads the files.
    return CLIPTokenizer.from_pretrained(directory, model_max_length=77)


def tiny_text_settings(vocab_size: int) -> dict:
    """A 2-layer, 32-wide CLIP text tower whose last two ids are the special tokens of `write_tokenizer_files`."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**tiny_text_settings(vocab_size)))


def build_tiny_pipeline(directory: Path) -> StableDiffusionPipeline:
    torch.manual_seed(SEED)
    tokenizer = build_tokenizer(directory / "tokenizer_files")
    # The toy world's builders, narrower and untrained; the order of the calls fixes the init draws.
    vae = components.build_vae(widths=(16, 32, 32), groups=16, image_size=LATENT_SIZE * 4)
    text_encoder = build_text_encoder(len(tokenizer))
    unet = components.build_unet(widths=(32, 64), text_width=32, groups=16, sample_size=LATENT_SIZE)
    return components.assemble(vae, text_encoder, tokenizer, unet)


def tiny_pipeline_dir(root: Path | None = None) -> Path:
    """Directory holding the saved tiny pipeline; built on first use, atomically (see `cached_pipeline_dir`)."""
    return cached_pipeline_dir(TINY_VERSION, build_tiny_pipeline, root)


def cached_pipeline_dir(name: str, builder: Callable[[Path], DiffusionPipeline], root: Path | None = None) -> Path:
    """`root/name` (root defaults to the cache) holding `builder(scratch_dir).save_pretrained(...)`; built once.

    Under torch.distributed only global rank 0 may build it (transformers writes weights on rank 0 only),
    so the main process goes first and the others then find it. `name` must be versioned: a finished
    directory is reused as is, never rebuilt.
    """
    with PartialState().main_process_first():
        return _build_once((root or cache_root()) / name, builder)


def _build_once(target: Path, builder: Callable[[Path], DiffusionPipeline]) -> Path:
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        builder(staging).save_pretrained(staging / "pipeline")
        give_normal_mode(staging / "pipeline")  # a shared cache: readable as any file the process writes
        try:
            (staging / "pipeline").rename(target)
        except OSError:  # another process finished first; its copy is identical
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
