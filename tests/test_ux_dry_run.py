"""--config.dry_run=True: every file the run reads, found or missing, without writing or downloading anything."""

import shutil

import pytest
from test_main import assert_one_clear_line, run_main

from alignprop.dry_run import dry_run, needs_of
from alignprop.errors import UserError
from alignprop.toyworld import pipeline_dir

REPO = "someone/toy-sd"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A local Hugging Face cache holding REPO (the toy-world pipeline) in the hub's layout; no network."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / "abc123"
    shutil.copytree(pipeline_dir(), snapshot)
    (cache / f"models--{REPO.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{REPO.replace('/', '--')}" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return snapshot


def hub_config(preset, tmp_path):
    config = preset("tiny")
    config.pretrained.model = REPO
    config.logdir = str(tmp_path / "logs")
    return config


def test_a_cached_hub_pipeline_is_listed_component_by_component(preset, tmp_path, hub_cache, capsys):
    needs = needs_of(hub_config(preset, tmp_path))
    names = [need.name for need in needs if need.what == "model"]
    for expected in (
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    ):
        assert f"{REPO}: {expected}" in names, expected
    assert all(need.present and need.size for need in needs if need.what == "model")
    assert dry_run(hub_config(preset, tmp_path), "tiny") == 0
    out = capsys.readouterr().out
    assert "MISSING" not in out and "all" in out.splitlines()[-1]
    assert not (tmp_path / "logs").exists()


def test_a_missing_component_file_is_named(preset, tmp_path, hub_cache, capsys):
    (hub_cache / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="1 of .* file\\(s\\) missing"):
        dry_run(hub_config(preset, tmp_path))
    missing = [line for line in capsys.readouterr().out.splitlines() if "MISSING" in line]
    assert len(missing) == 1 and "unet/diffusion_pytorch_model.safetensors" in missing[0]


def test_paper_preset_offline_lists_the_hub_files_and_the_shipped_ones(preset, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    needs = {need.name: need for need in needs_of(preset("aesthetic"))}
    assert not needs["stable-diffusion-v1-5/stable-diffusion-v1-5: model_index.json"].present
    assert not needs["openai/clip-vit-large-patch14: model.safetensors"].present
    head = next(need for need in needs.values() if need.what == "reward aesthetic: head")
    assert head.present and head.size > 3_000_000  # the shipped LAION head
    assert needs["simple_animals"].present and needs["eval_simple_animals"].present
    hps = {need.name: need for need in needs_of(preset("hps"))}
    assert not hps["xswu/HPSv2: HPS_v2_compressed.pt"].present and hps["hps_v2_all"].present


def test_main_py_dry_run_of_the_demo_finds_everything_and_writes_nothing(tmp_path):
    logdir = tmp_path / "logs"
    result = run_main("--config", "config/align_prop.py:tiny", "--config.dry_run=True", f"--config.logdir={logdir}")
    assert result.returncode == 0, result.stderr
    assert "MISSING" not in result.stdout and "toyworld" in result.stdout
    assert not logdir.exists()


def test_main_py_dry_run_with_missing_files_lists_them_and_exits_2(tmp_path):
    logdir = tmp_path / "logs"
    result = run_main(
        "--config",
        "config/align_prop.py:tiny",
        "--config.dry_run=True",
        f"--config.logdir={logdir}",
        "--config.pretrained.model=nobody/not-cached",
        "--config.eval_prompt_fn=/nonexistent/eval.txt",
        env={"HF_HUB_CACHE": str(tmp_path / "empty-cache")},
    )
    missing = [line for line in result.stdout.splitlines() if "MISSING" in line]
    assert len(missing) == 2 and "nobody/not-cached: model_index.json" in missing[0] and "eval.txt" in missing[1]
    assert_one_clear_line(result, "dry run: 2 of 4 file(s) missing", logdir)
