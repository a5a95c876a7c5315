"""ImageReward: a tiny random model saved in ImageReward's own format (ImageReward.pt with its key names,
med_config.json, a BERT WordPiece vocab.txt), loaded by the real loader and checked against a naive transcription
of ImageReward's scoring (THUDM/ImageReward @ c1392c6: ImageReward.py, models/BLIP/vit.py, models/BLIP/med.py)
written with plain torch ops on the same state dict."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from alignprop.dry_run import reward_needs
from alignprop.errors import UserError
from alignprop.rewards import build_reward
from alignprop.rewards.imagereward import SCORE_MEAN, SCORE_STD, ImageReward
from alignprop.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSpec, prepare
from alignprop.session import build_eval_rewards

PROMPTS = ["a cat", "a watercolor painting of a fox in the snow"]
# A tiny BLIP: ViT (width 128 = 2 heads of 64, as BLIP's ViTs, patch 32 at 224 px) and a BERT with cross-attention.
VISION_WIDTH, PATCH, IMAGE, VISION_LAYERS, VISION_MLP = 128, 32, 224, 2, 256
TEXT_WIDTH, TEXT_HEADS, TEXT_LAYERS, TEXT_MLP, MAX_POSITIONS = 32, 4, 2, 64, 40
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "cat", "of", "in", "the", "fox", "snow", "painting", "watercolor"]
LETTERS = [c for c in "bcdefghijklmnopqrstuvwxyz"]  # "a" is a word above
VOCAB = SPECIAL + WORDS + LETTERS + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
VOCAB_SIZE = len(VOCAB) + 2  # + [DEC] and [ENC], which BLIP adds


def med_config(**changes) -> dict:
    """ImageReward's med_config.json with tiny sizes (its encoder_width is replaced by the ViT's width)."""
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": TEXT_WIDTH,
        "initializer_range": 0.02,
        "intermediate_size": TEXT_MLP,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": MAX_POSITIONS,
        "model_type": "bert",
        "num_attention_heads": TEXT_HEADS,
        "num_hidden_layers": TEXT_LAYERS,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": VOCAB_SIZE,
        "encoder_width": 768,
        "add_cross_attention": True,
        **changes,
    }


def imagereward_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of ImageReward(med_config).state_dict(), named and shaped as in its code."""
    shapes = {
        "blip.visual_encoder.cls_token": (1, 1, VISION_WIDTH),
        "blip.visual_encoder.pos_embed": (1, (IMAGE // PATCH) ** 2 + 1, VISION_WIDTH),
        "blip.visual_encoder.patch_embed.proj.weight": (VISION_WIDTH, 3, PATCH, PATCH),
        "blip.visual_encoder.patch_embed.proj.bias": (VISION_WIDTH,),
        "blip.visual_encoder.norm.weight": (VISION_WIDTH,),
        "blip.visual_encoder.norm.bias": (VISION_WIDTH,),
        "blip.text_encoder.embeddings.word_embeddings.weight": (VOCAB_SIZE, TEXT_WIDTH),
        "blip.text_encoder.embeddings.position_embeddings.weight": (MAX_POSITIONS, TEXT_WIDTH),
        "blip.text_encoder.embeddings.LayerNorm.weight": (TEXT_WIDTH,),
        "blip.text_encoder.embeddings.LayerNorm.bias": (TEXT_WIDTH,),
        "blip.vision_proj.weight": (256, VISION_WIDTH),
        "blip.vision_proj.bias": (256,),
        "blip.text_proj.weight": (256, TEXT_WIDTH),
        "blip.text_proj.bias": (256,),
    }
    for i in range(VISION_LAYERS):
        block = f"blip.visual_encoder.blocks.{i}."
        for name, shape in {
            "norm1": (VISION_WIDTH,),
            "attn.qkv": (3 * VISION_WIDTH, VISION_WIDTH),
            "attn.proj": (VISION_WIDTH, VISION_WIDTH),
            "norm2": (VISION_WIDTH,),
            "mlp.fc1": (VISION_MLP, VISION_WIDTH),
            "mlp.fc2": (VISION_WIDTH, VISION_MLP),
        }.items():
            shapes[block + name + ".weight"], shapes[block + name + ".bias"] = shape, shape[:1]
    for i in range(TEXT_LAYERS):
        layer = f"blip.text_encoder.encoder.layer.{i}."
        linears = {
            "attention.self.query": (TEXT_WIDTH, TEXT_WIDTH),
            "attention.self.key": (TEXT_WIDTH, TEXT_WIDTH),
            "attention.self.value": (TEXT_WIDTH, TEXT_WIDTH),
            "attention.output.dense": (TEXT_WIDTH, TEXT_WIDTH),
            "attention.output.LayerNorm": (TEXT_WIDTH,),
            "crossattention.self.query": (TEXT_WIDTH, TEXT_WIDTH),
            "crossattention.self.key": (TEXT_WIDTH, VISION_WIDTH),
            "crossattention.self.value": (TEXT_WIDTH, VISION_WIDTH),
            "crossattention.output.dense": (TEXT_WIDTH, TEXT_WIDTH),
            "crossattention.output.LayerNorm": (TEXT_WIDTH,),
            "intermediate.dense": (TEXT_MLP, TEXT_WIDTH),
            "output.dense": (TEXT_WIDTH, TEXT_MLP),
            "output.LayerNorm": (TEXT_WIDTH,),
        }
        for name, shape in linears.items():
            shapes[layer + name + ".weight"], shapes[layer + name + ".bias"] = shape, shape[:1]
    for index, (fan_in, fan_out) in zip(
        (0, 2, 4, 6, 7), ((TEXT_WIDTH, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))
    ):
        shapes[f"mlp.layers.{index}.weight"], shapes[f"mlp.layers.{index}.bias"] = (fan_out, fan_in), (fan_out,)
    return shapes


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of a scale that keeps activations O(1): norms near 1, matrices ~ 1/sqrt(fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in imagereward_shapes().items():
        noise = torch.randn(shape, generator=generator)
        if "norm" in key.lower() and key.endswith("weight"):
            state_dict[key] = 1 + 0.1 * noise
        elif len(shape) >= 2 and "embed" not in key and "cls_token" not in key:
            fan_in = math.prod(shape[1:])
            state_dict[key] = noise / math.sqrt(fan_in)
        else:
            state_dict[key] = 0.1 * noise if key.endswith("bias") else 0.5 * noise
    state_dict["blip.text_encoder.embeddings.position_ids"] = torch.arange(MAX_POSITIONS).expand(1, -1)
    return state_dict


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    """(ImageReward.pt, med_config.json, tokenizer directory) in ImageReward's own formats."""
    directory = tmp_path_factory.mktemp("imagereward")
    torch.save(random_state_dict(), directory / "ImageReward.pt")
    (directory / "med_config.json").write_text(json.dumps(med_config()))
    tokenizer = directory / "bert-tokenizer"
    tokenizer.mkdir()
    # transformers 5's BertTokenizer(vocab_file=...) silently ignores the file; from_pretrained(dir) reads it.
    (tokenizer / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return directory / "ImageReward.pt", directory / "med_config.json", tokenizer


@pytest.fixture(scope="module")
def imagereward_config(preset, imagereward_files):
    def make(**options):
        config = preset("aesthetic")
        config.reward_fn = "imagereward"
        checkpoint, med_config_file, tokenizer = imagereward_files
        section = config.rewards.imagereward
        section.checkpoint, section.med_config, section.tokenizer = (
            str(checkpoint),
            str(med_config_file),
            str(tokenizer),
        )
        section.update(options)
        return config

    return make


@pytest.fixture(scope="module")
def load_imagereward(imagereward_config):
    def load(dtype=torch.float32, **options):
        return build_reward(imagereward_config(**options), torch.device("cpu"), dtype)

    return load


# --- the naive transcription -------------------------------------------------------------------------------------


def layer_norm(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def linear(x, sd, prefix):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def heads(x, count):
    batch, length, width = x.shape
    return x.view(batch, length, count, width // count).transpose(1, 2)


def attend(q, k, v, count, additive_mask=None):
    scores = heads(q, count) @ heads(k, count).transpose(-1, -2) / math.sqrt(q.shape[-1] // count)
    if additive_mask is not None:
        scores = scores + additive_mask
    out = scores.softmax(-1) @ heads(v, count)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def naive_vit(pixels, sd):
    """models/BLIP/vit.py VisionTransformer.forward (lines 176-190); qkv packed as (3, heads, head_dim)."""
    p = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd[p + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + sd[p + "pos_embed"]
    count = VISION_WIDTH // 64
    for i in range(VISION_LAYERS):
        b = f"{p}blocks.{i}."
        q, k, v = linear(layer_norm(x, sd, b + "norm1", 1e-6), sd, b + "attn.qkv").chunk(3, dim=-1)
        x = x + linear(attend(q, k, v, count), sd, b + "attn.proj")
        hidden = F.gelu(linear(layer_norm(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1"))
        x = x + linear(hidden, sd, b + "mlp.fc2")
    return layer_norm(x, sd, p + "norm", 1e-6)


def naive_text(input_ids, attention_mask, image_embeds, sd):
    """models/BLIP/med.py BertModel in 'multimodal' mode: self-attention masked by (1 - mask) x -10000,
    cross-attention to every image token, post-norm residuals."""
    p = "blip.text_encoder."
    eps = 1e-12
    x = sd[p + "embeddings.word_embeddings.weight"][input_ids]
    x = x + sd[p + "embeddings.position_embeddings.weight"][: input_ids.shape[1]]
    x = layer_norm(x, sd, p + "embeddings.LayerNorm", eps)
    mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    for i in range(TEXT_LAYERS):
        layer = f"{p}encoder.layer.{i}."
        for kind, context, kind_mask in (("attention", None, mask), ("crossattention", image_embeds, None)):
            source = x if context is None else context
            q, k, v = (
                linear(t, sd, f"{layer}{kind}.self.{n}") for t, n in ((x, "query"), (source, "key"), (source, "value"))
            )
            out = linear(attend(q, k, v, TEXT_HEADS, kind_mask), sd, f"{layer}{kind}.output.dense")
            x = layer_norm(out + x, sd, f"{layer}{kind}.output.LayerNorm", eps)
        hidden = F.gelu(linear(x, sd, layer + "intermediate.dense"))
        x = layer_norm(linear(hidden, sd, layer + "output.dense") + x, sd, layer + "output.LayerNorm", eps)
    return x


def naive_score(pixels, input_ids, attention_mask, sd):
    """ImageReward.score_gard (ImageReward.py lines 84-100): [CLS] -> linear head -> (r - mean) / std."""
    feature = naive_text(input_ids, attention_mask, naive_vit(pixels, sd), sd)[:, 0]
    for index in (0, 2, 4, 6, 7):
        feature = linear(feature, sd, f"mlp.layers.{index}")
    return (feature.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def hand_tokens(prompt: str) -> list[int]:
    """[CLS] word ids [SEP], zero-padded to 35: every word of PROMPTS is in VOCAB whole."""
    ids = [VOCAB.index("[CLS]"), *(VOCAB.index(word) for word in prompt.split()), VOCAB.index("[SEP]")]
    return ids + [0] * (35 - len(ids))


# --- tests -------------------------------------------------------------------------------------------------------


def sample_images(seed=0, shape=(2, 3, 240, 260)):
    """Non-square, away from the [-1, 1] clamp so that finite differences see a smooth function."""
    generator = torch.Generator().manual_seed(seed)
    return ((torch.rand(shape, generator=generator) * 2 - 1) * 0.8).requires_grad_(True)


def test_scores_match_a_naive_transcription(load_imagereward, imagereward_files, check_reward):
    reward = load_imagereward()
    assert isinstance(reward, ImageReward)
    assert (SCORE_MEAN, SCORE_STD) == (0.16717362830052426, 1.0333394966054072)
    # torchvision's Resize(224, bicubic) + CenterCrop(224) + CLIP mean/std, as ImageReward's _transform.
    assert reward.spec == ImageSpec(224, (224, 224), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, crop_offset="round")
    input_ids, attention_mask = reward.tokens(PROMPTS)
    assert input_ids.tolist() == [hand_tokens(prompt) for prompt in PROMPTS]
    assert attention_mask.sum(1).tolist() == [4, 11]
    images = sample_images()
    result = check_reward(reward, images, PROMPTS)
    state_dict = torch.load(imagereward_files[0], weights_only=True)
    with torch.no_grad():
        expected = naive_score(prepare(images, reward.spec), input_ids, attention_mask, state_dict)
    assert expected.std() > 0.1  # the tiny model tells the two samples apart
    torch.testing.assert_close(result.reward, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.loss, -result.reward)


def test_pixel_gradient_matches_finite_differences(load_imagereward):
    reward = load_imagereward(dtype=torch.float64)  # float64 model; preprocessing is float32
    images = sample_images(seed=1, shape=(1, 3, 224, 224))
    direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    direction = direction / direction.norm() * math.sqrt(direction.numel()) * 0.01  # about 0.01 per pixel
    reward.score(images, PROMPTS[:1]).reward.sum()  # warm-up; reward is detached
    loss = reward.score(images, PROMPTS[:1]).loss.sum()
    (gradient,) = torch.autograd.grad(loss, images)
    analytic = float((gradient.double() * direction).sum())
    step = 0.5
    with torch.no_grad():
        plus = reward.score(images + step * direction.float(), PROMPTS[:1]).loss.double()
        minus = reward.score(images - step * direction.float(), PROMPTS[:1]).loss.double()
    numeric = float((plus - minus).sum() / (2 * step))
    assert abs(analytic) > 1e-3
    assert numeric == pytest.approx(analytic, rel=2e-3)


def test_bf16_keeps_the_head_in_float32(load_imagereward):
    reward = load_imagereward(dtype=torch.bfloat16)
    assert reward.model.text.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert reward.model.head[0].weight.dtype == torch.float32
    images = sample_images()
    fp32 = load_imagereward().score(images, PROMPTS).reward
    assert torch.allclose(reward.score(images, PROMPTS).reward, fp32, atol=0.05 * fp32.abs().max())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.pop("blip.text_encoder.encoder.layer.1.crossattention.self.key.bias"), r"1 missing \(e.g. "),
        (lambda sd: sd.update({"blip.itm_head.weight": torch.zeros(2, TEXT_WIDTH)}), r"1 unexpected \(e.g. blip.itm"),
        (
            lambda sd: sd.update({"mlp.layers.4.weight": torch.zeros(64, 127)}),
            r"1 wrong shape \(e.g. mlp.layers.4.weight \(64, 127\) vs \(64, 128\)\)",
        ),
    ],
    ids=["missing", "extra", "mis-shaped"],
)
def test_a_state_dict_that_does_not_fit_is_refused(load_imagereward, tmp_path, change, message):
    state_dict = random_state_dict()
    change(state_dict)
    torch.save(state_dict, tmp_path / "ImageReward.pt")
    with pytest.raises(UserError, match=r"is not an ImageReward checkpoint for this med_config: " + message) as error:
        load_imagereward(checkpoint=str(tmp_path / "ImageReward.pt"))
    assert "\n" not in str(error.value)


def test_the_unused_contrastive_projections_may_be_absent(load_imagereward, tmp_path):
    state_dict = {k: v for k, v in random_state_dict().items() if "_proj." not in k and "position_ids" not in k}
    torch.save(state_dict, tmp_path / "ImageReward.pt")
    images = sample_images()
    reward = load_imagereward(checkpoint=str(tmp_path / "ImageReward.pt")).score(images, PROMPTS).reward
    assert torch.equal(reward, load_imagereward().score(images, PROMPTS).reward)


def test_wrong_med_config_and_tokenizer_are_refused(load_imagereward, tmp_path):
    (tmp_path / "med_config.json").write_text(json.dumps(med_config(num_attention_heads=TEXT_HEADS, hidden_size=64)))
    with pytest.raises(UserError, match=r"for this med_config: \d+ wrong shape"):
        load_imagereward(med_config=str(tmp_path / "med_config.json"))
    (tmp_path / "med_config.json").write_text(json.dumps(med_config(add_cross_attention=False)))
    with pytest.raises(UserError, match=r"does not describe BLIP's image-grounded text encoder"):
        load_imagereward(med_config=str(tmp_path / "med_config.json"))
    (tmp_path / "empty-tokenizer").mkdir()
    with pytest.raises(UserError, match=r"has 7 tokens with \[DEC\] and \[ENC\], but the text encoder expects 67"):
        load_imagereward(tokenizer=str(tmp_path / "empty-tokenizer"))
    with pytest.raises(UserError, match=r"does not exist; set config.rewards.imagereward.checkpoint"):
        load_imagereward(checkpoint=str(tmp_path / "ImageReward.pt"))


def test_pickled_objects_are_refused(load_imagereward, tmp_path):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "ImageReward.pt")
    with pytest.raises(UserError, match=r"holds pickled Python objects .* refused for safety"):
        load_imagereward(checkpoint=str(tmp_path / "ImageReward.pt"))


def test_dry_run_lists_its_files(imagereward_config, imagereward_files):
    needs = reward_needs("imagereward", imagereward_config())
    checkpoint, med_config_file, tokenizer = imagereward_files
    assert [(need.what, need.path) for need in needs] == [
        ("reward imagereward: checkpoint", checkpoint),
        ("reward imagereward: med_config", med_config_file),
        ("reward imagereward: tokenizer", tokenizer / "tokenizer_config.json"),
        ("reward imagereward: tokenizer", tokenizer / "vocab.txt"),
    ]
    hub = reward_needs("imagereward", imagereward_config(checkpoint="", med_config=""))
    assert [need.name for need in hub[:2]] == [
        "THUDM/ImageReward: ImageReward.pt",
        "THUDM/ImageReward: med_config.json",
    ]


def test_it_serves_as_a_held_out_reward(imagereward_config):
    config = imagereward_config()
    config.reward_fn, config.eval_reward_fns = "compressibility", "imagereward"
    rewards = build_eval_rewards(config, torch.device("cpu"), torch.float32)
    assert list(rewards) == ["imagereward"] and isinstance(rewards["imagereward"], ImageReward)
    assert not rewards["imagereward"].training


def test_it_serves_srpo_relative_reward(imagereward_config):
    """rewards.relative_control on ImageReward: the score with the positive phrase minus the negative one."""
    from alignprop.rewards.relative import Relative

    control = ("a watercolor", "a snow")  # words of the tiny vocabulary: the two phrasings differ
    config = imagereward_config()
    config.rewards.relative_control = control
    relative = build_reward(config, torch.device("cpu"), torch.float32)
    plain = build_reward(imagereward_config(), torch.device("cpu"), torch.float32)
    assert isinstance(relative, Relative)
    images = sample_images()
    result = relative.score(images, PROMPTS)
    positive = plain.score(images, [f"{control[0]} {prompt}" for prompt in PROMPTS]).reward
    negative = plain.score(images, [f"{control[1]} {prompt}" for prompt in PROMPTS]).reward
    torch.testing.assert_close(result.reward, positive - negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.loss, negative - positive, rtol=0, atol=1e-6)  # loss = -(relative reward)
    assert result.reward.abs().max() > 1e-4  # the phrases change the score
