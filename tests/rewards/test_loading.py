import argparse

import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file

from alignprop.errors import UserError
from alignprop.rewards.loading import (
    extract_state_dict,
    load_tensor_file,
    load_weights_into,
    pretrained_source,
    resolve_file,
)


def test_safetensors_and_torch_files_round_trip(tmp_path):
    tensors = {"weight": torch.randn(3, 2), "bias": torch.zeros(3)}
    save_file(tensors, tmp_path / "w.safetensors")
    torch.save(tensors, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = load_tensor_file(tmp_path / name)
        assert set(loaded) == set(tensors) and torch.equal(loaded["weight"], tensors["weight"])


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "training-checkpoint.pt"
    torch.save({"state_dict": {"weight": torch.ones(1)}, "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(UserError, match=r"pickled Python objects \(argparse.Namespace\).*refused.*weights_only=True"):
        load_tensor_file(path)


def test_unreadable_file_is_a_user_error(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"cannot read weights file"):
        load_tensor_file(path)


def test_state_dict_unwrapping(tmp_path):
    tensors = {"module.weight": torch.ones(2)}
    assert list(extract_state_dict({"state_dict": tensors, "epoch": 3}, tmp_path)) == ["weight"]
    with pytest.raises(UserError, match=r"not a state dict: some of its values are not tensors"):
        extract_state_dict({"weight": torch.ones(2), "step": 5}, tmp_path)
    with pytest.raises(UserError, match=r"not a state dict"):
        extract_state_dict([torch.ones(2)], tmp_path)


def test_load_weights_into_requires_an_exact_fit(tmp_path):
    module = torch.nn.Linear(2, 3)
    good, wrong = tmp_path / "good.pt", tmp_path / "wrong.pt"
    torch.save({"weight": torch.ones(3, 2), "bias": torch.zeros(3)}, good)
    torch.save({"weight": torch.ones(4, 2), "extra": torch.zeros(1)}, wrong)
    load_weights_into(module, good, "linear", "opt")
    assert torch.equal(module.weight, torch.ones(3, 2))
    with pytest.raises(UserError, match=r"1 missing \(e.g. bias\); 1 unexpected \(e.g. extra\); 1 wrong shape"):
        load_weights_into(module, wrong, "linear", "opt")


def test_sources(tmp_path):
    assert pretrained_source(str(tmp_path), "opt") == str(tmp_path)
    assert pretrained_source("openai/clip-vit-large-patch14", "opt") == "openai/clip-vit-large-patch14"
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"opt=.* is a file"):
        pretrained_source(str(tmp_path / "file"), "opt")
    with pytest.raises(UserError, match=r"neither an existing directory nor a hub id"):
        pretrained_source(str(tmp_path / "absent"), "opt")


def test_offline_hub_download_says_how_to_supply_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"cannot fetch 'HPS_v2.1_compressed.pt' .* set opt=/path/to/HPS_v2.1"):
        resolve_file("", "xswu/HPSv2", "HPS_v2.1_compressed.pt", "opt")
