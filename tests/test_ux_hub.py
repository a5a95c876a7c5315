"""push_to_hub: the final LoRA with a model card, written to RUN/hub/ and uploaded; offline it stays local."""

import pytest
import torch

from alignprop import hub, schema
from alignprop.errors import UserError
from alignprop.lora_files import LORA_FILE_NAME

BEFORE = {"reward_mean": 0.814, "reward_std": 0.2, "checker_shape_mean": 0.9}
AFTER = {"reward_mean": 0.906, "reward_std": 0.1, "checker_shape_mean": 0.967}


@pytest.fixture
def finished_run(tmp_path):
    """What a training run leaves that push_to_hub publishes: lora/ and before_after.png."""
    from safetensors.torch import save_file

    run_dir = tmp_path / "logs" / "2026.01.01_demo"
    (run_dir / "lora").mkdir(parents=True)
    save_file({"unet.x.lora_A.weight": torch.zeros(1)}, run_dir / "lora" / LORA_FILE_NAME)
    (run_dir / "before_after.png").write_bytes(b"png")
    return run_dir


def test_model_card_says_what_was_trained_and_how_well(preset, finished_run):
    config = preset("tiny")
    card = hub.card_text(config, "config/align_prop.py:tiny", finished_run, 40, BEFORE, AFTER)
    assert card.startswith("---\nbase_model: toyworld\n")
    for fragment in (
        "`toyworld_shape`",
        "`config/align_prop.py:tiny`",
        "| optimizer updates | 40 |",
        "| sampler | DDIM, 20 steps, eta 0, guidance 1 |",
        "| reward_mean | 0.814 | 0.906 |",
        "| checker_shape_mean | 0.9 | 0.967 |",
        "![before and after](before_after.png)",
        'load_lora_weights("2026.01.01_demo")',
    ):
        assert fragment in card, fragment


def test_the_card_of_a_flow_model_names_its_sampler_and_t5_length(preset, finished_run):
    from safetensors.torch import save_file

    save_file({"transformer.x.lora_A.weight": torch.zeros(1)}, finished_run / "lora" / LORA_FILE_NAME)
    config = preset("tiny_flow")
    config.pretrained.max_sequence_length = 32
    card = hub.card_text(config, "config/align_prop.py:tiny_flow", finished_run, 40, BEFORE, AFTER)
    assert "| sampler | flow-matching Euler, 10 steps, guidance 1 |" in card
    assert "| T5 prompt tokens | 32 (`max_sequence_length`) |" in card
    assert "image = pipe(prompt, max_sequence_length=32).images[0]" in card
    assert "T5 prompt tokens" not in hub.card_text(preset("tiny"), "tiny", finished_run, 40, BEFORE, AFTER)


def test_offline_writes_the_folder_and_says_so_in_one_line(preset, finished_run, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    never = lambda folder, repo: pytest.fail("no upload may be tried offline")  # noqa: E731
    line = hub.publish(preset("tiny"), "tiny", finished_run, 40, BEFORE, AFTER, uploader=never)
    folder = finished_run / "hub"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "before_after.png",
        "pytorch_lora_weights.safetensors",
    ]
    assert "\n" not in line and "offline" in line and str(folder) in line


def test_an_unreachable_hub_keeps_the_folder_and_says_how_to_upload_later(preset, finished_run, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    config = preset("tiny")
    config.hub_model_id = "me/toy-lora"

    def unreachable(folder, repo):
        raise ConnectionError("Failed to resolve huggingface.co\nsecond line")

    line = hub.publish(config, "tiny", finished_run, 40, BEFORE, AFTER, uploader=unreachable)
    assert "\n" not in line and "'me/toy-lora'" in line and "ConnectionError" in line
    assert f"hf upload me/toy-lora {finished_run / 'hub'}" in line
    assert (finished_run / "hub" / "README.md").read_text().count("# me/toy-lora") == 1


def test_a_reachable_hub_gets_the_folder(preset, finished_run, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    uploaded = []
    line = hub.publish(
        preset("tiny"),
        "tiny",
        finished_run,
        40,
        BEFORE,
        AFTER,
        uploader=lambda folder, repo: uploaded.append((folder, repo)) or f"https://hf.co/{repo}",
    )
    assert uploaded == [(finished_run / "hub", "2026.01.01_demo")] and "uploaded" in line


def test_push_to_hub_is_off_by_default_and_needs_a_training_run(preset):
    config = preset("tiny")
    assert not config.push_to_hub and config.hub_model_id == ""
    config.push_to_hub, config.only_eval = True, True
    with pytest.raises(UserError, match="push_to_hub publishes a trained LoRA"):
        schema.check(config)
