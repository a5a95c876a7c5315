"""The toy world's flow-matching model: a Stable Diffusion 3 pipeline at toy scale, same data, captions and VAE.

`StableDiffusion3Pipeline` over real diffusers/transformers classes: the toy VAE (32x32x3 <-> 8x8x4, with
`shift_factor=0.0` registered, as SD3's pipeline adds it back), an `SD3Transformer2DModel` (MMDiT) on the 8x8x4
latents, two word-level CLIP text encoders with projection (SD3's CLIP-L and OpenCLIP-G slots) over the toy
vocabulary, no T5 (`text_encoder_3=None`, which SD3's pipeline supports), and `FlowMatchEulerDiscreteScheduler`.

Why SD3 and not FLUX: SD3's pipeline runs without T5 and takes its text from the two CLIP towers, which the toy
world's word-level tokenizer already fits; FLUX's pipeline needs a T5 encoder and tokenizer for its token sequence
(512 tokens by default) and feeds CLIP only as a pooled vector.

T5's place: SD3's pipeline, run without T5 (`text_encoder_3=None`), stands in zeros for T5's hidden states:
`encode_prompt`'s default `max_sequence_length` (256) zero tokens after the 16 CLIP tokens. But a directory saved
that way loads only when the caller passes `text_encoder_3=None, tokenizer_3=None` to `from_pretrained` (diffusers
treats them as required), so the shipped pipeline carries a *null T5* instead: a `T5EncoderModel` with no layers and
zero weights, whose output is exactly those zeros (with a character-level T5 tokenizer, `vocab.t5_tokenizer`).
The stock `from_pretrained(directory)` then loads it, and images equal those of the T5-less pipeline.

The transformer maps each zero token to the same context token and treats them identically in every block, so for
training they collapse exactly into one token whose attention logit carries log(256)
(`CollapsedPaddingProcessor`); the shipped model is the stock one and sees the 256 tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.models.attention_processor import JointAttnProcessor2_0
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

from alignprop.toyworld import components
from alignprop.toyworld.components import LATENT_SIZE, TEXT_WIDTH
from alignprop.toyworld.vocab import t5_tokenizer

# `StableDiffusion3Pipeline.encode_prompt`'s default max_sequence_length: the zero "T5" tokens without T5.
T5_PADDING = 256
TRANSFORMER = {"layers": 4, "heads": 4, "head_dim": 24, "patch_size": 1}
# The sampling schedule's shift. SD3 shifts by 3.0 at 1024 px and by 1.0 at 256 px (Esser et al. 2024, sec. 5.3.2:
# the shift grows with the resolution); the toy's 32 px is below both, so no shift.
SHIFT = 1.0


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    """The UNet toy's 2-layer CLIP text tower, with projection. SD3 reads its penultimate layer's hidden states (the
    first layer here) and the projected pooled output (the end-of-text token's)."""
    return components.build_text_encoder(tokenizer, projection=True)


def build_transformer(
    layers: int = TRANSFORMER["layers"],
    heads: int = TRANSFORMER["heads"],
    head_dim: int = TRANSFORMER["head_dim"],
    patch_size: int = TRANSFORMER["patch_size"],
    text_width: int = TEXT_WIDTH,
) -> SD3Transformer2DModel:
    """An MMDiT (SD3 3.0 blocks, no q/k norm) over 8x8x4 latents; context: both CLIP towers' hidden states side by
    side (2 x text_width wide), pooled: both projections."""
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=2 * text_width,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * text_width,
        pos_embed_max_size=LATENT_SIZE // patch_size,
    )


def deepen(transformer: SD3Transformer2DModel, extra_layers: int) -> SD3Transformer2DModel:
    """The same function with `extra_layers` more joint blocks, inserted before the last one (which alone skips the
    context update): each new block's adaLN-Zero modulations are zero, so its gates are zero and the block passes
    both streams through unchanged, as DiT initialises its blocks (Peebles & Xie 2023). Training then grows them from
    there: depth added to a trained model without losing what it draws."""
    layers = transformer.config.num_layers
    deeper = SD3Transformer2DModel.from_config({**transformer.config, "num_layers": layers + extra_layers})
    for block in deeper.transformer_blocks[layers - 1 : layers - 1 + extra_layers]:
        for modulation in (block.norm1.linear, block.norm1_context.linear):
            torch.nn.init.zeros_(modulation.weight)
            torch.nn.init.zeros_(modulation.bias)
    state = deeper.state_dict()  # the inserted blocks as just initialised; everything else is overwritten
    last, moved = f"transformer_blocks.{layers - 1}.", f"transformer_blocks.{layers - 1 + extra_layers}."
    for name, tensor in transformer.state_dict().items():
        state[moved + name.removeprefix(last) if name.startswith(last) else name] = tensor
    deeper.load_state_dict(state, strict=True)
    return deeper


def flow_scheduler(shift: float = SHIFT) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def flow_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """The toy VAE's weights with SD3's `shift_factor` in its config (0.0: the toy latents are not shifted)."""
    vae.register_to_config(shift_factor=0.0)
    return vae


def build_null_t5(width: int, tokenizer) -> T5EncoderModel:
    """A T5 encoder whose hidden states are exactly zero: no blocks, zero embeddings, zero final-norm weight."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=8,
        num_layers=0,
        num_heads=1,
        feed_forward_proj="relu",
        is_encoder_decoder=False,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    encoder = T5EncoderModel(config)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.zero_()
    return encoder


def assemble_flow(vae, text_encoder, text_encoder_2, tokenizer, transformer, shift: float = SHIFT):
    tokenizer_3 = t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=flow_scheduler(shift),
        vae=flow_vae(vae),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=build_null_t5(transformer.config.joint_attention_dim, tokenizer_3),
        tokenizer_3=tokenizer_3,
    )


def encode_ids(text_encoders, ids: torch.Tensor, padding: int = T5_PADDING):
    """`StableDiffusion3Pipeline.encode_prompt` on token ids, differentiably: (context, pooled). The context is both
    towers' penultimate hidden states side by side, then `padding` zero tokens (T5's place)."""
    outputs = [encoder(ids, output_hidden_states=True) for encoder in text_encoders]
    context = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
    pooled = torch.cat([output[0] for output in outputs], dim=-1)
    zeros = context.new_zeros(context.shape[0], padding, context.shape[-1])
    return torch.cat([context, zeros], dim=1), pooled


class CollapsedPaddingProcessor(JointAttnProcessor2_0):
    """`JointAttnProcessor2_0` where the last context token stands for `copies` identical tokens: its attention logit
    gets log(copies), which is exactly the stock attention over the copies (same keys, same values). `copies` is one
    count, or one per sample (a tensor (batch,)): training draws it, so the model serves any `max_sequence_length`."""

    def __init__(self, copies: int | torch.Tensor = T5_PADDING):
        super().__init__()
        self.copies = copies

    def padding_bias(self, batch_size: int, keys: int, like: torch.Tensor) -> torch.Tensor:
        """Additive attention mask (batch, 1, 1, keys): log(copies) on the last key, 0 elsewhere."""
        copies = torch.as_tensor(self.copies, dtype=like.dtype, device=like.device).expand(batch_size)
        bias = like.new_zeros(batch_size, 1, 1, keys)
        bias[:, 0, 0, -1] = copies.log()
        return bias

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch_size, image_tokens = hidden_states.shape[:2]
        head_dim = attn.inner_dim // attn.heads
        streams = [(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)]
        streams.append(
            (encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            + (attn.norm_added_q, attn.norm_added_k)
        )
        queries, keys, values = [], [], []
        for states, to_q, to_k, to_v, norm_q, norm_k in streams:
            q, k, v = (proj(states).view(batch_size, -1, attn.heads, head_dim) for proj in (to_q, to_k, to_v))
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            queries.append(norm_q(q) if norm_q is not None else q)
            keys.append(norm_k(k) if norm_k is not None else k)
            values.append(v)
        query, key, value = torch.cat(queries, dim=2), torch.cat(keys, dim=2), torch.cat(values, dim=2)
        bias = self.padding_bias(batch_size, key.shape[2], query)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        image, context = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


def collapse_padding(transformer: SD3Transformer2DModel, copies: int = T5_PADDING) -> CollapsedPaddingProcessor:
    """Train-time attention: the context's last token counts `copies` times (see `CollapsedPaddingProcessor`). Returns
    the processor, shared by every block: set its `copies` to change the count."""
    processor = CollapsedPaddingProcessor(copies)
    transformer.set_attn_processor(processor)
    return processor


def restore_attention(transformer: SD3Transformer2DModel) -> SD3Transformer2DModel:
    transformer.set_attn_processor(JointAttnProcessor2_0())
    return transformer
