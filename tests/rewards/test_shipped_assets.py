"""The files copied from the original AlignProp repository: byte-exact, and the real aesthetic head loads."""

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

from alignprop.errors import UserError
from alignprop.rewards.aesthetic import SHIPPED_HEAD, AestheticHead, head_file
from alignprop.rewards.loading import load_weights_into

ASSETS = Path(__file__).resolve().parents[2] / "assets"
# assets/README.md lists the same digests.
SHA256 = {
    "aesthetic/sac+logos+ava1-l14-linearMSE.pth": "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
    "prompts/hps_v2_all.txt": "52f0074b2d5fe70a8ffd0ca8daf7b5ad420c9a930f03c38a97e7f2d8aa5df429",
    "prompts/hps_v2_all_eval.txt": "1af515e74b71687531d6a4e83489b10c7214a8d5c4da04621c45bf76fe739049",
    "prompts/simple_animals.txt": "ee3d9b638ce2a40e896a34319af85709d3c1c3188da0b8feda739dcb7363188d",
    "prompts/eval_simple_animals.txt": "98a6bac4b2a867a66ca46e8b1786ab321887ea46e05295a88ee1890c60280020",
}
# The real head on three fixed unit vectors (torch.manual_seed(0), randn(3, 768)), computed once in float64.
PINNED_SCORES = [5.542574006, 5.365060374, 4.944704256]


@pytest.mark.parametrize("name", sorted(SHA256))
def test_files_are_the_originals(name):
    assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() == SHA256[name]
    assert (ASSETS / "LICENSE-AlignProp").read_text().startswith("MIT License")


def test_real_head_loads_as_plain_tensors_and_fits_exactly():
    tensors = torch.load(SHIPPED_HEAD, map_location="cpu", weights_only=True)
    expected = {name: tuple(tensor.shape) for name, tensor in AestheticHead(768).state_dict().items()}
    assert {name: tuple(tensor.shape) for name, tensor in tensors.items()} == expected


def test_real_head_gives_the_pinned_scores():
    head = AestheticHead(768)
    load_weights_into(head, SHIPPED_HEAD, "LAION aesthetic head", "test")
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(3, 768), dim=-1)
    with torch.no_grad():
        scores = head.eval()(embeddings)
    assert scores.tolist() == pytest.approx(PINNED_SCORES, abs=1e-5)


def test_head_source_shipped_by_default_hub_on_request(preset):
    options = preset("aesthetic").rewards.aesthetic
    assert head_file(options) == SHIPPED_HEAD
    options.head_repo = "trl-lib/ddpo-aesthetic-predictor"  # tests run offline: the hub path must say so
    with pytest.raises(UserError, match=r"cannot fetch 'aesthetic-model.pth' from .* 'trl-lib/ddpo-aesthetic"):
        head_file(options)


@pytest.fixture(scope="module")
def clip_with_l14_projection(tmp_path_factory):
    """A tiny vision tower whose embedding has ViT-L/14's 768 dimensions, so the real head fits it."""
    directory = tmp_path_factory.mktemp("clip-768")
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=768,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def test_aesthetic_preset_scores_with_the_shipped_head(preset, clip_with_l14_projection, images):
    from alignprop.rewards import build_reward

    config = preset("aesthetic")
    config.rewards.aesthetic.clip_model = str(clip_with_l14_projection)
    config.rewards.preprocess = "processor"  # the 40x48 test images are not square
    reward = build_reward(config, torch.device("cpu"), torch.float32)
    shipped = torch.load(SHIPPED_HEAD, map_location="cpu", weights_only=True)
    assert all(torch.equal(reward.head.state_dict()[name], tensor) for name, tensor in shipped.items())
    assert torch.isfinite(reward.score(images, ["", ""]).reward).all()
