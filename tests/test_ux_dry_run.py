"""--config.dry_run=True: every file the run reads, found or missing, without writing or downloading anything."""

import json
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
    snapshot = main_snapshot(cache, REPO)
    shutil.copytree(pipeline_dir(), snapshot, dirs_exist_ok=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return snapshot


def main_snapshot(cache, repo: str):
    """The folder of `repo`'s one snapshot in a hub cache, its main branch pointing at it."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text("abc123")
    return repo_dir / "snapshots" / "abc123"


def hub_config(preset, tmp_path, name: str = "tiny", repo: str = REPO):
    config = preset(name)
    config.pretrained.model = repo
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


# --- how to download what is missing -------------------------------------------------------------------------

FLUX_REPO = "someone/flux-like"  # a FLUX-type repository the way the hub holds FLUX.1-dev (its shape, tiny)
NOT_READ = (  # files such a repository also holds that a run never reads: a download must skip them
    "flux1-dev.safetensors",  # the single-file checkpoint beside the folders (23 GB for FLUX.1-dev)
    "transformer/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "README.md",
)


@pytest.fixture
def flux_remote(tmp_path):
    """The repository as the hub holds it: the tiny FLUX pipeline with a sharded transformer, plus NOT_READ."""
    from diffusers import FluxTransformer2DModel

    from alignprop.models import resolve_model_source

    remote = tmp_path / "remote"
    shutil.copytree(resolve_model_source("tiny_flux"), remote)
    transformer = FluxTransformer2DModel.from_pretrained(remote / "transformer")
    shutil.rmtree(remote / "transformer")
    transformer.save_pretrained(remote / "transformer", max_shard_size="40KB")
    assert len(list((remote / "transformer").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    for name in NOT_READ:
        (remote / name).write_bytes(b"not read by a run")
    return remote


def flux_config(preset, tmp_path):
    return hub_config(preset, tmp_path, "tiny_flow", FLUX_REPO)


def cache_files(remote, cache, files) -> None:
    """Put `files` of `remote` into the hub cache as hf download would (one snapshot of the main branch)."""
    snapshot = main_snapshot(cache, FLUX_REPO)
    for name in files:
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(remote / name, snapshot / name)


def parsed_include(command: str, monkeypatch) -> tuple[str, list[str]]:
    """The repository and patterns huggingface_hub's own `hf download` passes to snapshot_download for `command`
    (the download itself replaced by a recorder)."""
    import shlex

    import huggingface_hub.cli.download
    from huggingface_hub.cli.hf import app

    words, seen = shlex.split(command), {}
    monkeypatch.setattr(huggingface_hub.cli.download, "snapshot_download", lambda **kwargs: seen.update(kwargs) or "")
    assert words[:2] == ["hf", "download"]
    app.main(words[1:], prog_name="hf", standalone_mode=False)
    return seen["repo_id"], list(seen["allow_patterns"])


def test_the_download_command_fetches_what_the_run_reads_and_nothing_else(
    preset, tmp_path, flux_remote, monkeypatch, capsys
):
    """Before model_index.json is cached, a known repository's components come from its pipeline class; the
    printed command, parsed by the hf CLI and filtered as snapshot_download filters, fetches a cache the run
    then loads from offline, and none of NOT_READ."""
    import huggingface_hub.constants
    from huggingface_hub.utils import filter_repo_objects

    from alignprop import hub_repos, models

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setitem(hub_repos.KNOWN_PIPELINES, FLUX_REPO, "FluxPipeline")
    with pytest.raises(UserError, match="download them with the commands above"):
        dry_run(flux_config(preset, tmp_path))
    out = capsys.readouterr().out
    start = out.index(f"  hf download {FLUX_REPO}")
    command = out[start : out.index("\nthe run:", start)].replace("\\\n", " ")
    repo, include = parsed_include(command, monkeypatch)
    listing = [str(path.relative_to(flux_remote)) for path in flux_remote.rglob("*") if path.is_file()]
    fetched = set(filter_repo_objects(listing, allow_patterns=include))
    assert repo == FLUX_REPO and not fetched & set(NOT_READ)
    assert "transformer/diffusion_pytorch_model.safetensors.index.json" in fetched
    cache_files(flux_remote, cache, fetched)

    needs = needs_of(flux_config(preset, tmp_path))
    assert all(need.present for need in needs), [need.name for need in needs if not need.present]
    shards = next(
        need for need in needs if need.name.endswith("transformer/diffusion_pytorch_model.safetensors.index.json")
    )
    on_disk = sum(path.stat().st_size for path in (flux_remote / "transformer").glob("diffusion_pytorch_model-*"))
    assert shards.size == on_disk  # a sharded checkpoint's size: its shards'
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pipeline = models.load_pipeline(FLUX_REPO)
    assert type(pipeline).__name__ == "FluxPipeline" and pipeline.transformer.config.num_layers >= 1


def test_a_cached_index_with_missing_shards_is_missing_with_the_size_still_to_download(
    preset, tmp_path, flux_remote, monkeypatch
):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    listing = [str(path.relative_to(flux_remote)) for path in flux_remote.rglob("*") if path.is_file()]
    shards = sorted(name for name in listing if "diffusion_pytorch_model-" in name)
    cache_files(flux_remote, cache, [name for name in listing if name != shards[0]])
    needs = needs_of(flux_config(preset, tmp_path))
    [missing] = [need for need in needs if not need.present]
    assert missing.name.endswith(f"index.json (1 of {len(shards)} shards missing)")
    index = json.loads((flux_remote / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    others = sum((flux_remote / name).stat().st_size for name in shards[1:])
    assert missing.size == index["metadata"]["total_size"] - others > 0


def test_a_gated_preset_model_says_where_to_accept_its_licence(preset, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    for name, gated in (("hps_flux", True), ("hps_sdxl", False)):
        config = preset(name)
        config.logdir = str(tmp_path / "logs")
        with pytest.raises(UserError):
            dry_run(config, name)
        out = capsys.readouterr().out
        note = f"gated: accept the licence at https://huggingface.co/{config.pretrained.model}"
        assert (note in out) == gated, name
        assert "  hf download xswu/HPSv2 --include HPS_v2.1_compressed.pt\n" in out
        listed = [line for line in out.splitlines() if "MISSING" in line and "/config.json" in line]
        assert {line.split(": ")[-1].split("/")[0] for line in listed} >= {"text_encoder", "vae"}
    assert not (tmp_path / "logs").exists()


def test_the_dry_run_says_the_same_arithmetic_as_the_run(preset, tmp_path, capsys):
    """The dry run's plan lines are the run's own start-up lines; with a fixed cut, the gradient calls it
    announces are those the run logs for every update."""
    from alignprop.jobs import run_job

    config = preset("tiny")
    config.logdir, config.num_epochs = str(tmp_path / "logs"), 1
    config.truncation_strategy, config.trunc_backprop_timestep = "fixed", 17
    dry_run(config, "tiny")
    out = capsys.readouterr().out
    planned = [line.strip() for line in out[out.index("\nthe run:\n") :].splitlines() if line.startswith("  ")]
    _, run_dir, _ = run_job(config)
    started = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert planned and all(line in started for line in planned), planned
    calls = next(line for line in planned if line.startswith("denoiser calls per sample:"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {record["gradient_calls"] for record in records if "gradient_calls" in record}
    assert len(logged) == 1 and calls.startswith(f"denoiser calls per sample: {logged.pop():g} with gradient")


def test_every_training_preset_plans_in_lines_that_fit_a_terminal(preset):
    """The start-up (and dry-run) plan of every training preset, each line at most 120 characters."""
    from test_schema import preset_names

    from alignprop.batching import plan_batches
    from alignprop.jobs import describe_plan

    for name in preset_names():
        config = preset(name)
        if config.only_eval or config.soup_inference:
            continue
        lines = describe_plan(config, plan_batches(config.train, 1), 0, "flux", "transformer")
        assert all(len(line) <= 120 for line in lines), (name, [line for line in lines if len(line) > 120])


def test_an_evaluation_dry_run_says_how_many_images_the_evaluation_makes(preset, tmp_path, capsys):
    from alignprop.jobs import run_job

    config = preset("tiny")
    config.logdir, config.only_eval, config.resume_from = str(tmp_path / "logs"), True, "base"
    config.eval_images_per_prompt = 2
    dry_run(config, "tiny")
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("the evaluation:"))
    _, run_dir, _ = run_job(config)
    images = len(list((run_dir / "images").glob("*.png")))
    assert line.startswith(f"the evaluation: {images} images (toyworld_heldout, all), {config.steps} sampler steps")
    assert images == 60  # the 30 held-out captions, 2 images each
