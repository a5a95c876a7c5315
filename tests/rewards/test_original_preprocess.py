"""rewards.preprocess="original" against a transcription of the original AlignProp code's reward inputs.

The original (aesthetic and HPS alike) did, on the decoded images:
    im_pix = ((im_pix / 2) + 0.5).clamp(0, 1)
    im_pix = torchvision.transforms.Resize(224)(im_pix)      # torchvision 0.15 on a tensor: no antialiasing
    im_pix = normalize(im_pix)                                # CLIP mean / std
Today's torchvision antialiases tensors by default, so the transcription spells out antialias=False.
"""

import open_clip
import pytest
import torch
import torchvision.transforms as T
from transformers import CLIPModel

from alignprop.errors import UserError
from alignprop.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSpec, prepare, resize_like_original

PROMPTS = ["a cat", "a watercolor painting of a fox in the snow"]


def original_transform(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    pixels = ((images / 2) + 0.5).clamp(0, 1)
    pixels = T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=False)(pixels)
    return T.Normalize(mean=list(OPENAI_CLIP_MEAN), std=list(OPENAI_CLIP_STD))(pixels)


def values_and_gradient(transform, images: torch.Tensor, cotangent_seed: int = 1):
    """transform(images) and d<transform(images), random cotangent>/d images."""
    images = images.detach().clone().requires_grad_(True)
    output = transform(images)
    cotangent = torch.randn(output.shape, generator=torch.Generator().manual_seed(cotangent_seed))
    (gradient,) = torch.autograd.grad((output * cotangent).sum(), images)
    return output.detach(), gradient


def random_images(shape, seed: int = 0) -> torch.Tensor:
    """Values slightly beyond [-1, 1], as decoded latents give, so the clamp is exercised too."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2.2 - 1.1


@pytest.mark.parametrize("size", [512, 256, 224, 160])  # SD 1.5's 512 px; no-op resize; upsampling
def test_equals_the_original_transform_in_values_and_gradients(size):
    images = random_images((2, 3, size, size))
    ours, our_gradient = values_and_gradient(lambda x: prepare(x, ImageSpec(224, (224, 224), mode="original")), images)
    theirs, their_gradient = values_and_gradient(original_transform, images)
    assert ours.shape == (2, 3, 224, 224)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    assert torch.allclose(our_gradient, their_gradient, atol=1e-6, rtol=0)


def test_resize_sizes_follow_torchvision_for_any_shape():
    images = random_images((1, 3, 333, 517))
    expected = T.Resize(224, antialias=False)(images)
    assert torch.allclose(resize_like_original(images, 224), expected, atol=1e-6, rtol=0)


def test_non_square_images_are_refused_not_cropped():
    with pytest.raises(UserError, match=r"rewards.preprocess='original' resizes \(512, 768\) images to \(224, 336\)"):
        prepare(random_images((1, 3, 512, 768)), ImageSpec(224, (224, 224), mode="original"))


def test_original_mode_differs_from_the_processor_mode():
    """The reason the switch exists: values and, above all, gradients change."""
    images = random_images((1, 3, 512, 512)).clamp(-0.9, 0.9)
    original, original_gradient = values_and_gradient(
        lambda x: prepare(x, ImageSpec(224, (224, 224), mode="original")), images
    )
    processor, processor_gradient = values_and_gradient(lambda x: prepare(x, ImageSpec(224, (224, 224))), images)
    assert (original - processor).abs().mean() > 0.05
    # Without antialiasing, 512 -> 224 bilinear reads only the 2 nearest rows/columns of each sample point.
    reached = lambda gradient: (gradient != 0).float().mean().item()  # noqa: E731
    assert reached(processor_gradient) == 1.0
    assert reached(original_gradient) < 0.8


def test_aesthetic_in_original_mode_scores_the_transcribed_input(load_reward, tiny_clip_dir):
    reward = load_reward("aesthetic", options={"preprocess": "original"}, aesthetic_target=None, grad_scale=1.0)
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()  # as the original loaded it

    def transcription(images):  # the original's AestheticScorerDiff on its transformed input
        embedding = clip.get_image_features(pixel_values=original_transform(images, size=32)).pooler_output
        return reward.head(embedding / embedding.norm(dim=-1, keepdim=True))

    images = random_images((2, 3, 48, 48))
    ours, our_gradient = values_and_gradient(lambda x: -reward.score(x, PROMPTS).loss, images)
    theirs, their_gradient = values_and_gradient(transcription, images)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(our_gradient, their_gradient, atol=1e-6)


def test_hps_in_original_mode_scores_the_transcribed_input(load_reward, tiny_open_clip, hps_checkpoint):
    reward = load_reward("hps", options={"preprocess": "original"})
    model = open_clip.create_model(tiny_open_clip, pretrained=None)
    model.load_state_dict(torch.load(hps_checkpoint, weights_only=True)["state_dict"])
    model.eval()
    text = model.encode_text(open_clip.get_tokenizer(tiny_open_clip)(PROMPTS)).detach()

    def transcription(images):  # the original's hps_loss_fn: diag of normalised image . text features
        image = model.encode_image(original_transform(images, size=32))
        return ((image / image.norm(dim=-1, keepdim=True)) * (text / text.norm(dim=-1, keepdim=True))).sum(-1)

    images = random_images((2, 3, 48, 48))
    ours, our_gradient = values_and_gradient(lambda x: 1 - reward.score(x, PROMPTS).loss, images)
    theirs, their_gradient = values_and_gradient(transcription, images)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(our_gradient, their_gradient, atol=1e-6)


@pytest.mark.parametrize("reward_fn", ["pickscore", "clip_score"])
def test_clip_rewards_honour_the_switch_too(load_reward, reward_fn):
    assert load_reward(reward_fn).clip.spec.mode == "processor"
    assert load_reward(reward_fn, options={"preprocess": "original"}).clip.spec.mode == "original"


def test_unknown_mode_is_one_clear_error(load_reward):
    with pytest.raises(UserError, match=r"^rewards.preprocess='pil'; choose one of: original, processor$"):
        load_reward("colorfulness", options={"preprocess": "pil"})
