"""Transformers CLIP models as reward backbones: loading, tokenizer, preprocessing spec, embeddings.

Sources are hub ids (`openai/clip-vit-large-patch14`) or local directories written by `save_pretrained`.
Models load in the inference dtype with SDPA attention; embeddings are normalised in float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import transformers
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from alignprop.errors import UserError, excerpt, first_line
from alignprop.rewards.loading import pretrained_source
from alignprop.rewards.preprocess import ImageSpec, prepare

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as stored in preprocessor_config.json


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report: we check missing and mismatched weights ourselves, and the
    report would otherwise list the (expected) unused text-tower weights of every vision-only load."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def load_pretrained(model_class, source: str, option: str, dtype: torch.dtype):
    """`model_class.from_pretrained(source)` in `dtype` with SDPA; every weight must come from the source."""
    source = pretrained_source(source, option)
    try:
        with quiet_transformers():
            model, info = model_class.from_pretrained(
                source, dtype=dtype, attn_implementation="sdpa", output_loading_info=True
            )
    except Exception as error:  # missing files, offline hub, wrong architecture, size mismatch
        raise UserError(
            f"cannot load {model_class.__name__} from {excerpt(source)} ({first_line(error)}); check {option}"
        ) from None
    missing = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"])
    if missing:
        raise UserError(
            f"{excerpt(source)} is not a {model_class.__name__} checkpoint: {len(missing)} weights missing or "
            f"mismatched (e.g. {missing[0]}); check {option}"
        )
    return model


def load_tokenizer(source: str, option: str, vocab_size: int) -> CLIPTokenizer:
    """The CLIP tokenizer in `source`; it must cover the text model's `vocab_size` tokens exactly."""
    source = pretrained_source(source, option)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source)
    except Exception as error:
        raise UserError(
            f"cannot load a CLIP tokenizer from {excerpt(source)} ({first_line(error)}); check {option}"
        ) from None
    # transformers builds an empty tokenizer, without complaint, from a directory lacking vocab files.
    if len(tokenizer) != vocab_size:
        raise UserError(
            f"the tokenizer in {excerpt(source)} has {len(tokenizer)} tokens but the text model expects "
            f"{vocab_size}; check {option}"
        )
    return tokenizer


def load_image_spec(source: str, option: str) -> ImageSpec:
    """Resize/crop/mean/std from a CLIP `preprocessor_config.json` (the processor used in training)."""
    source = pretrained_source(source, option)
    try:
        processor = CLIPImageProcessorPil.from_pretrained(source)
    except Exception as error:
        raise UserError(
            f"cannot load a CLIP image processor config from {excerpt(source)} ({first_line(error)}); check {option}"
        ) from None
    size, crop = processor.size, processor.crop_size
    if not (processor.do_resize and processor.do_center_crop and size.shortest_edge and crop.height):
        raise UserError(f"{excerpt(source)}: only shortest-side resize + centre crop processors are supported")
    if processor.resample != BICUBIC:
        raise UserError(f"{excerpt(source)}: only bicubic resizing is supported, not resample={processor.resample}")
    return ImageSpec(
        resize=size.shortest_edge,
        crop=(crop.height, crop.width),
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
    )


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """L2-normalise in float32 (fp16 norms of 768-1024-dim vectors lose precision)."""
    vectors = vectors.float()
    return vectors / vectors.norm(dim=-1, keepdim=True)


class ClipEmbedder(torch.nn.Module):
    """A CLIPModel with its tokenizer and image spec: unit image and text embeddings."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, spec: ImageSpec):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable w.r.t. `images` ([-1, 1], NCHW)."""
        pixels = prepare(images, self.spec).to(self.model.dtype)
        return unit(self.model.get_image_features(pixel_values=pixels).pooler_output)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.model.device)
        return unit(self.model.get_text_features(**tokens).pooler_output)


def load_clip_embedder(settings, prefix: str) -> ClipEmbedder:
    """The CLIPModel `settings.options.model`, with tokenizer and image spec from `options.processor` (empty:
    the model's own), preprocessing in `settings.preprocess` mode. `prefix` names the options in error
    messages, e.g. "config.rewards.pickscore"."""
    options = settings.options
    processor_source = options.processor or options.model
    model = load_pretrained(CLIPModel, options.model, f"{prefix}.model", settings.dtype)
    tokenizer = load_tokenizer(processor_source, f"{prefix}.processor", model.config.text_config.vocab_size)
    spec = replace(load_image_spec(processor_source, f"{prefix}.processor"), mode=settings.preprocess)
    return ClipEmbedder(model, tokenizer, spec)
