"""FlowBP's HPDv2 test prompts (`hpdv2_test`, shipped) and the `evaluate_hpdv2` preset, checked without downloads."""

import hashlib
from pathlib import Path

from test_main import run_main

from alignprop import schema
from alignprop.dry_run import needs_of
from alignprop.prompts import BUILTIN, load_prompts

ROOT = Path(__file__).resolve().parent.parent
PROMPT_FILE = ROOT / "assets" / "hpdv2" / "eval_prompts.txt"
SHA256 = "21b84c438f4205f5daa970d5fd66ededa6912821717204d8ad13180c012ec5a2"  # FlowBP @ 93b220a, assets/eval_prompts.txt


def test_the_shipped_file_is_flowbps_and_holds_400_prompts():
    assert BUILTIN["hpdv2_test"] == PROMPT_FILE
    data = PROMPT_FILE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256
    assert data.count(b"\n") == 399 and not data.endswith(b"\n")  # 400 lines, the last without a newline
    prompts = load_prompts("hpdv2_test")
    assert len(prompts) == len(set(prompts)) == 400
    assert prompts[0] == "Dwayne the Rock Johnson wrestles Jesus Christ in a WWE match in a hell in a cell."
    assert "Apache License" in (PROMPT_FILE.parent / "LICENSE").read_text()
    assert "93b220ad48782357efd55bfdf5e0a987f9b035f2" in (PROMPT_FILE.parent / "README.md").read_text()


def test_the_preset_is_flowbps_protocol_and_validates(preset, monkeypatch, tmp_path):
    import huggingface_hub.constants

    config = preset("evaluate_hpdv2")
    schema.check(config)
    assert config.only_eval and config.resume_from == "base"  # the base model unless a run is given
    assert (config.eval_prompt_fn, config.eval_prompts, config.eval_images_per_prompt) == ("hpdv2_test", "all", 1)
    assert (config.eval_seeding, config.seed) == ("per_prompt", 42)
    assert (config.reward_fn, config.rewards.hps.version, config.eval_reward_fns) == (
        "hps",
        "v2.1",
        "pickscore,clip_score,imagereward",
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    needs = {need.name: need for need in needs_of(config)}
    assert needs["hpdv2_test"].present
    for name in (
        "xswu/HPSv2: HPS_v2.1_compressed.pt",
        "yuvalkirstain/PickScore_v1: model.safetensors",
        "openai/clip-vit-large-patch14: model.safetensors",
        "THUDM/ImageReward: ImageReward.pt",
    ):
        assert not needs[name].present, name  # listed, not fetched: the cache is empty


def test_main_py_dry_run_of_the_preset_lists_what_is_missing_and_writes_nothing(tmp_path):
    logdir = tmp_path / "logs"
    result = run_main(
        "--config",
        "config/align_prop.py:evaluate_hpdv2",
        "--config.dry_run=True",
        f"--config.logdir={logdir}",
        "--config.pretrained.model=tiny",  # a model that needs no download: every missing file is a reward's
        "--config.resolution=64",
        env={"HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    missing = [line for line in result.stdout.splitlines() if "MISSING" in line]
    assert missing and all("reward " in line for line in missing), result.stdout
    assert "hpdv2_test" in result.stdout and not logdir.exists()
