"""push_to_hub: the final LoRA with a model card, written to RUN/hub/ and uploaded; offline it stays local, the line
says the exact `hf upload` command and main.py exits with status 3. The card's snippet regenerates the run's final
evaluation images with the stock diffusers pipeline."""

import re

import numpy as np
import pytest
import torch
from checkpoint_runs import run
from small_runs import small_config
from test_main import run_main

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


def front_matter(card: str) -> list[str]:
    return card.split("---\n")[1].splitlines()


def rows(card: str) -> dict[str, str]:
    return dict(re.findall(r"^\| ([^|]+) \| (.+) \|$", card, flags=re.M))


def test_model_card_says_what_was_trained_and_how_well(preset, finished_run):
    config = preset("tiny")
    card = hub.card_text(config, "config/align_prop.py:tiny", finished_run, 40, BEFORE, AFTER)
    table = rows(card)
    assert table["reward"].startswith("`toyworld_shape`")
    assert table["preset"] == "`config/align_prop.py:tiny`"
    assert table["optimizer updates"] == "40"
    assert table["samples per update"] == "8"  # 2 passes of 4
    assert table["sampler"].startswith("DDIM (`DDIMScheduler` on the model's schedule), 20 steps, eta 0, guidance 1")
    # The gradient path and its truncation, as the start-up line names them.
    assert table["gradient path"].startswith("truncation (strategy=per_step_uniform, steps=20, minmax=(0, 20))")
    assert "| reward_mean | 0.814 | 0.906 |" in card and "| checker_shape_mean | 0.9 | 0.967 |" in card
    assert "![before and after](before_after.png)" in card
    # No namespace known (offline): the repo id says where the user's goes, never a bare name.
    assert f'snapshot_download("{hub.NAMESPACE_PLACEHOLDER}/2026.01.01_demo")' in card
    assert "# YOUR-NAMESPACE/2026.01.01_demo" in card
    assert "pipe.load_lora_weights(folder)" in card
    # The toy-world base is local: no hub id in the metadata, its path in the snippet, its licence (alignprop's).
    assert not any(line.startswith("base_model:") for line in front_matter(card))
    assert "license: mit" in front_matter(card) and "local model, not on the hub" in table["base model"]
    assert '.from_pretrained("toyworld"' not in card


def test_hub_models_carry_their_id_licence_and_the_ddim_switch(preset, finished_run):
    config = preset("aesthetic")
    config.hub_model_id = "me/animals"
    card = hub.card_text(config, "aesthetic", finished_run, 14, BEFORE, AFTER)
    meta = front_matter(card)
    assert (
        "base_model: stable-diffusion-v1-5/stable-diffusion-v1-5" in meta and "license: creativeml-openrail-m" in meta
    )
    assert "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)" in card
    assert "from diffusers import DDIMScheduler, StableDiffusionPipeline" in card
    assert 'snapshot_download("me/animals")' in card
    assert rows(card)["samples per update"] == "128"


def test_flux_dev_carries_its_non_commercial_licence_and_unknown_bases_say_so(preset, finished_run):
    config = preset("hps_flux")
    meta = front_matter(hub.card_text(config, "hps_flux", finished_run, 400, BEFORE, AFTER))
    assert meta[:4] == [
        "base_model: black-forest-labs/FLUX.1-dev",
        "license: other",
        "license_name: flux-1-dev-non-commercial-license",
        "license_link: https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
    ]
    config.pretrained.model = "someone/unheard-of"
    card = hub.card_text(config, "hps_flux", finished_run, 400, BEFORE, AFTER)
    assert "license: unknown" in front_matter(card) and "not known to alignprop" in rows(card)["licence"]


def test_the_card_of_a_flow_model_names_its_sampler_and_t5_length(preset, finished_run):
    config = preset("tiny_flow")
    config.pretrained.max_sequence_length = 32
    card = hub.card_text(config, "config/align_prop.py:tiny_flow", finished_run, 40, BEFORE, AFTER)
    table = rows(card)
    assert table["sampler"].startswith("flow-matching Euler (`FlowMatchEulerDiscreteScheduler`, the pipeline's sigmas)")
    assert "10 steps, guidance 1" in table["sampler"]
    assert table["T5 prompt tokens"] == "32 (`max_sequence_length`)"
    assert "max_sequence_length=32" in card and "DDIMScheduler" not in card
    assert "T5 prompt tokens" not in hub.card_text(preset("tiny"), "tiny", finished_run, 40, BEFORE, AFTER)


def snippet_of(card: str) -> str:
    return card.split("```python\n")[1].split("```")[0]


@pytest.mark.parametrize(
    ("model", "seeding"), [("tiny_sdxl", "sequential"), ("tiny_flux", "sequential"), ("toyworld", "per_prompt")]
)
def test_the_cards_snippet_regenerates_the_final_evaluation_images(preset, tmp_path, model, seeding, monkeypatch):
    """A run published offline; the card's Python, run as a stranger would (the repo id pointing at the folder), on
    the stock pipeline: the final evaluation's images exactly. SDXL's saved scheduler is Euler (the card must switch
    to DDIM), FLUX's latents are packed, eval_seeding="per_prompt" draws each latent from its own generator."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = small_config(preset, tmp_path, run_name="published", push_to_hub=True, num_epochs=1)
    config.pretrained.model, config.hub_model_id = model, "me/toy"
    config.sd_guidance_scale = 2.0  # CFG on SDXL, the embedded guidance on FLUX
    config.eval_seeding = seeding
    run_dir, (_, after) = run(config)
    line, uploaded = hub.publish(config, "", run_dir, 2, after.summary(), after.summary())
    assert not uploaded and line.endswith(f"hf upload me/toy {run_dir / 'hub'}")
    card = (run_dir / "hub" / "README.md").read_text()
    assert "regenerates the final evaluation's images exactly (in 8 bits)" in card  # mixed_precision="no"
    code = snippet_of(card)
    assert code.count('snapshot_download("me/toy")') == 1
    namespace = {}
    exec(code.replace('snapshot_download("me/toy")', repr(str(run_dir / "hub"))), namespace)  # noqa: S102
    images = np.stack([np.asarray(image) for image in namespace["images"]])
    ours = np.round(((after.images.permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1) * 255).astype(np.uint8)
    # Equal to ours rounded to 8 bits, as the pipeline's PIL images are (without the DDIM switch 7% of SDXL's pixels
    # differ; without packing FLUX fails).
    assert images.shape == ours.shape and np.array_equal(images, ours)


def test_offline_writes_the_folder_and_says_how_to_upload(preset, finished_run, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    never = lambda folder, repo: pytest.fail("no upload may be tried offline")  # noqa: E731
    line, uploaded = hub.publish(preset("tiny"), "tiny", finished_run, 40, BEFORE, AFTER, uploader=never)
    folder = finished_run / "hub"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "before_after.png",
        "pytorch_lora_weights.safetensors",
    ]
    assert not uploaded and "\n" not in line and "offline" in line
    assert f"hf upload YOUR-NAMESPACE/2026.01.01_demo {folder} (replace YOUR-NAMESPACE" in line


def test_an_unreachable_hub_keeps_the_folder_and_says_how_to_upload_later(preset, finished_run, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    config = preset("tiny")
    config.hub_model_id = "me/toy-lora"

    def unreachable(folder, repo):
        raise ConnectionError("Failed to resolve huggingface.co\nsecond line")

    line, uploaded = hub.publish(config, "tiny", finished_run, 40, BEFORE, AFTER, uploader=unreachable)
    assert not uploaded and "\n" not in line and "ConnectionError" in line
    assert line.endswith(f"hf upload me/toy-lora {finished_run / 'hub'}")
    assert (finished_run / "hub" / "README.md").read_text().count("# me/toy-lora") == 1


def test_a_reachable_hub_gets_the_folder_in_the_users_namespace(preset, finished_run, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    uploaded = []
    line, done = hub.publish(
        preset("tiny"),
        "tiny",
        finished_run,
        40,
        BEFORE,
        AFTER,
        uploader=lambda folder, repo: uploaded.append((folder, repo)) or f"https://hf.co/{repo}",
        who=lambda: "alice",
    )
    assert uploaded == [(finished_run / "hub", "alice/2026.01.01_demo")] and done and "uploaded" in line
    assert 'snapshot_download("alice/2026.01.01_demo")' in (finished_run / "hub" / "README.md").read_text()


def test_main_exits_3_with_the_upload_command_when_nothing_was_uploaded(tmp_path):
    """The command line: the run completes and writes RUN/hub/, the last line is the command, the status is 3."""
    logdir, prompts = tmp_path / "logs", tmp_path / "eval.txt"
    prompts.write_text("a red circle on a blue background\na green square on a yellow background\n")
    result = run_main(
        "--config",
        "config/align_prop.py:tiny",
        f"--config.logdir={logdir}",
        "--config.run_name=pushed",
        "--config.push_to_hub=True",
        "--config.hub_model_id=me/toy",
        "--config.num_epochs=1",
        "--config.steps=2",
        "--config.truncated_backprop_minmax=(0,2)",
        "--config.train.total_samples_per_epoch=4",
        "--config.train.total_batch_size=4",
        f"--config.eval_prompt_fn={prompts}",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == hub.NOT_UPLOADED, result.stderr
    assert result.stdout.strip().splitlines()[-1].endswith(f"hf upload me/toy {logdir / 'pushed' / 'hub'}")
    assert (logdir / "pushed" / "hub" / "README.md").is_file() and (logdir / "pushed" / "lora").is_dir()
    assert (logdir / "pushed" / "hub" / hub.PROMPTS_FILE).read_text() == prompts.read_text()


def test_push_to_hub_is_off_by_default_and_needs_a_training_run(preset):
    config = preset("tiny")
    assert not config.push_to_hub and config.hub_model_id == ""
    config.push_to_hub, config.only_eval = True, True
    with pytest.raises(UserError, match="push_to_hub publishes a trained LoRA"):
        schema.check(config)


def test_not_logged_in_writes_the_placeholder_namespace_and_says_so(preset, finished_run, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def not_logged_in():
        raise OSError("Invalid user token.")

    never = lambda folder, repo: pytest.fail("no upload without a namespace")  # noqa: E731
    line, uploaded = hub.publish(
        preset("tiny"), "tiny", finished_run, 40, BEFORE, AFTER, uploader=never, who=not_logged_in
    )
    assert not uploaded and "OSError: Invalid user token." in line
    assert f"hf upload YOUR-NAMESPACE/2026.01.01_demo {finished_run / 'hub'} (replace YOUR-NAMESPACE" in line
    assert "# YOUR-NAMESPACE/2026.01.01_demo" in (finished_run / "hub" / "README.md").read_text()
