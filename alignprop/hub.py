"""`--config.push_to_hub=True`: the final weights and a model card, in RUN/hub/ and then on the Hugging Face hub.

The folder is always written first (README.md with the card, the LoRA in diffusers format or, after a full
fine-tuning, the denoiser's folder `unet/` | `transformer/` in save_pretrained layout, the before/after grid), so a
run without a hub (offline, not logged in, no network) keeps exactly what would have been uploaded
and says so in one line; `hf upload <repo> RUN/hub` sends it later.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

HUB_DIR = "hub"
GRID_FILE = "before_after.png"
DENOISER_DIRS = ("unet", "transformer")  # a full fine-tuning's final folder (`Family.denoiser_name`)


def full_denoiser(run_dir: Path) -> Path | None:
    """The run's final denoiser folder when it fine-tuned every denoiser weight, else None (a LoRA run)."""
    from alignprop.denoiser_files import is_denoiser_folder

    return next((run_dir / name for name in DENOISER_DIRS if is_denoiser_folder(run_dir / name)), None)


def repo_id(config, run_dir: Path) -> str:
    """hub_model_id, or the run directory's name (a repo of the logged-in user)."""
    return config.hub_model_id or run_dir.name


def single_file_pipeline(config) -> str:
    """The pipeline class that loads a single-file base model: its layout's (pretrained.config), else SD1.x/2.x."""
    from alignprop import models

    layout = config.pretrained.get("config", "")
    try:
        source = models.resolve_model_source(layout) if layout else ""
        return models.pipeline_class_name(config.pretrained.model, config.pretrained.revision, source)
    except Exception:  # the card is written after training: an unreadable layout only loses the class's name
        return "StableDiffusionPipeline"


def base_lines(config) -> tuple[list[str], str, list[str]]:
    """(YAML metadata lines, the card's "base model" value, the Python lines that load the base pipeline)."""
    from alignprop.models import SINGLE_FILE_SUFFIXES

    base = config.pretrained.model
    if not base.endswith(SINGLE_FILE_SUFFIXES):
        load = ["from diffusers import DiffusionPipeline", "", f'pipe = DiffusionPipeline.from_pretrained("{base}")']
        return [f"base_model: {base}"], f"`{base}`", load
    # A local file is no hub model id: no base_model metadata; its layout travels with it (pretrained.config).
    layout = config.pretrained.get("config", "")
    pipeline = single_file_pipeline(config)
    where = f', config="{layout}"' if layout else ""
    value = f"`{base}` (single file; layout `{layout}`)" if layout else f"`{base}` (single file)"
    return [], value, [f"from diffusers import {pipeline}", "", f'pipe = {pipeline}.from_single_file("{base}"{where})']


def sampler_row(config, run_dir: Path) -> str:
    """The card's sampler: DDIM for a UNet LoRA, the flow-matching Euler step (no eta) for a transformer LoRA (SD3,
    FLUX: diffusers saves their layers as `transformer.*`)."""
    from safetensors import safe_open

    from alignprop.lora_files import LORA_FILE_NAME

    path, keys = run_dir / "lora" / LORA_FILE_NAME, []
    if path.is_file():
        with safe_open(path, "pt") as weights:
            keys = list(weights.keys())
    full = full_denoiser(run_dir)
    if any(key.startswith("transformer.") for key in keys) or (full is not None and full.name == "transformer"):
        return f"flow-matching Euler, {config.steps} steps, guidance {config.sd_guidance_scale:g}"
    return f"DDIM, {config.steps} steps, eta {config.eta:g}, guidance {config.sd_guidance_scale:g}"


def trained_lines(config, run_dir: Path) -> tuple[str, tuple[str, str], list[str]]:
    """(what the card's first line calls the weights, the card's row saying what trained, the Python lines that put
    them into the loaded pipeline `pipe`)."""
    from alignprop.denoiser_files import saved_class_name

    repo, full = repo_id(config, run_dir), full_denoiser(run_dir)
    if full is None:
        lora = f"rank {config.lora.rank}, alpha {config.lora.alpha:g}, on {', '.join(config.lora.target_modules)}"
        return "A LoRA", ("LoRA", lora), [f'pipe.load_lora_weights("{repo}")']
    name, model_class = full.name, saved_class_name(full)
    load = [
        f"from diffusers import {model_class}",
        f'pipe.{name} = {model_class}.from_pretrained("{repo}", subfolder="{name}", torch_dtype=pipe.dtype)',
    ]
    return f"A fully fine-tuned {name}", ("fine-tuned", f"every weight of the {name} (train.finetune=full)"), load


def card_text(config, preset: str, run_dir: Path, updates: int, before: dict, after: dict) -> str:
    """The model card: YAML metadata for the hub, then what was trained, how, and how well."""
    metadata, base, load = base_lines(config)
    what, trained_row, use = trained_lines(config, run_dir)
    rows = [
        ("base model", base),
        ("reward", f"`{config.reward_fn}`"),
        ("preset", f"`{preset}`" if preset else "(a config given in code)"),
        ("optimizer updates", str(updates)),
        ("training prompts / evaluation prompts", f"`{config.prompt_fn}` / `{config.eval_prompt_fn}`"),
        trained_row,
        ("sampler", sampler_row(config, run_dir)),
        ("learning rate", f"{config.train.learning_rate:g} ({config.train.lr_scheduler})"),
        ("seed", str(config.seed)),
    ]
    tokens = config.pretrained.get("max_sequence_length", 0)
    sample = [f"image = pipe(prompt, max_sequence_length={tokens}).images[0]  # as trained"] if tokens else []
    if tokens:
        rows.insert(-2, ("T5 prompt tokens", f"{tokens} (`max_sequence_length`)"))
    scores = [
        f"| {name} | {before[name]:.4g} | {after[name]:.4g} |"
        for name in after
        if name.endswith(("_mean", "_std")) and name in before and isinstance(after[name], float)
    ]
    return "\n".join(
        [
            "---",
            *metadata,
            "library_name: diffusers",
            "tags:",
            *(f"- {tag}" for tag in ("text-to-image", "diffusers", *(["lora"] * (what == "A LoRA")), "alignprop")),
            f"- {config.reward_fn}",
            "---",
            "",
            f"# {repo_id(config, run_dir)}",
            "",
            f"{what} for {base} fine-tuned with AlignProp (reward backpropagation through the sampling chain) "
            f"on the `{config.reward_fn}` reward.",
            "",
            "| setting | value |",
            "|---|---|",
            *(f"| {name} | {value} |" for name, value in rows),
            "",
            "## Evaluation (before -> after training, the run's final evaluation)",
            "",
            "| metric | before | after |",
            "|---|---|---|",
            *scores,
            "",
            f"![before and after]({GRID_FILE})",
            "",
            "## Use",
            "",
            "```python",
            *load,
            *use,
            *sample,
            "```",
            "",
        ]
    )


def write_folder(config, preset: str, run_dir: Path, updates: int, before: dict, after: dict) -> Path:
    """RUN/hub/: README.md (the card), the LoRA file(s) or the denoiser's folder, and the before/after grid."""
    folder = run_dir / HUB_DIR
    folder.mkdir(exist_ok=True)
    full = full_denoiser(run_dir)
    if full is not None:
        shutil.copytree(full, folder / full.name, dirs_exist_ok=True)
    else:
        for file in sorted((run_dir / "lora").iterdir()):
            shutil.copy2(file, folder / file.name)
    if (run_dir / GRID_FILE).exists():
        shutil.copy2(run_dir / GRID_FILE, folder / GRID_FILE)
    (folder / "README.md").write_text(card_text(config, preset, run_dir, updates, before, after))
    return folder


def upload(folder: Path, repo: str) -> str:
    """Create the repo (if needed) and upload the folder; returns the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message="AlignProp fine-tuning")
    return str(url)


def publish(
    config, preset: str, run_dir: Path, updates: int, before: dict, after: dict, uploader: Callable | None = None
) -> str:
    """Write RUN/hub/ and upload it; returns the one line to print (where it went, or why it stayed local)."""
    from huggingface_hub import constants

    folder = write_folder(config, preset, run_dir, updates, before, after)
    repo = repo_id(config, run_dir)
    if constants.is_offline_mode():
        return f"push_to_hub: offline (HF_HUB_OFFLINE): model card and weights written to {folder}, not uploaded"
    try:
        url = (uploader or upload)(folder, repo)
    except Exception as error:  # no network, not logged in, no write access: the folder stays for later
        reason = f"{type(error).__name__}: {' '.join(str(error).split())[:120]}"
        return (
            f"push_to_hub: could not upload to {repo!r} ({reason}); model card and weights are in {folder} "
            f"(later: hf upload {repo} {folder})"
        )
    return f"push_to_hub: uploaded {folder} to {url}"
