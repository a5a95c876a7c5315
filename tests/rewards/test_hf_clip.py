import json

import pytest

from alignprop.errors import UserError
from alignprop.rewards.hf_clip import load_image_spec
from alignprop.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSpec

# The format of openai/clip-vit-large-patch14's and laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor files.
LEGACY_PROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
    "resample": 3,
    "size": 224,
}


def write_processor(directory, **changes):
    (directory / "preprocessor_config.json").write_text(json.dumps({**LEGACY_PROCESSOR, **changes}))
    return str(directory)


def test_legacy_processor_config(tmp_path):
    assert load_image_spec(write_processor(tmp_path), "opt") == ImageSpec(224, (224, 224))


def test_unsupported_processors_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"only bicubic resizing is supported, not resample=2"):
        load_image_spec(write_processor(tmp_path, resample=2), "opt")
    with pytest.raises(UserError, match=r"only shortest-side resize \+ centre crop"):
        load_image_spec(write_processor(tmp_path, do_center_crop=False), "opt")
