"""`--config.push_to_hub=True`: the final weights and a model card, in RUN/hub/ and then on the Hugging Face hub.

The folder is always written first (README.md with the card, the LoRA in diffusers format or, after a full
fine-tuning, the denoiser's folder `unet/` | `transformer/` in save_pretrained layout, the before/after grid, the
final evaluation's prompts), so a run without a hub (offline, not logged in, no network) keeps exactly what would
have been uploaded. `publish` says in one line where it went or, when nothing was uploaded, the exact `hf upload`
command that sends it later; the command line then exits with status NOT_UPLOADED.

The card says what was trained (base model and its licence, reward, gradient path and truncation, samples per
update, updates, LoRA or full fine-tuning) and how the run sampled (scheduler, steps, guidance, image size), and its
snippet regenerates the final evaluation's images with the stock diffusers pipeline: prompt i of
`evaluation_prompts.txt` on latent i of one CPU generator seeded with the evaluation's seed, in batches.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from alignprop.hub_repos import KNOWN_PIPELINES, LICENCES, Licence

HUB_DIR = "hub"
GRID_FILE = "before_after.png"
PROMPTS_FILE = "evaluation_prompts.txt"  # the final evaluation's prompts, in latent order
DENOISER_DIRS = ("unet", "transformer")  # a full fine-tuning's final folder (`Family.denoiser_name`)
NAMESPACE_PLACEHOLDER = "YOUR-NAMESPACE"  # a bare hub_model_id while the logged-in user is unknown (offline)
NOT_UPLOADED = 3  # the command line's exit status when push_to_hub wrote RUN/hub/ but did not upload it
OWN_MODELS_LICENCE = Licence("mit")  # the toy-world and tiny models are alignprop's own (its LICENSE)
UNKNOWN_LICENCE = Licence("unknown")


def full_denoiser(run_dir: Path) -> Path | None:
    """The run's final denoiser folder when it fine-tuned every denoiser weight, else None (a LoRA run)."""
    from alignprop.denoiser_files import is_denoiser_folder

    return next((run_dir / name for name in DENOISER_DIRS if is_denoiser_folder(run_dir / name)), None)


def repo_id(config, run_dir: Path, namespace: str = "") -> str:
    """hub_model_id, or the run directory's name; in `namespace` (the logged-in user) when it names none, or in
    NAMESPACE_PLACEHOLDER when that is unknown (offline)."""
    name = config.hub_model_id or run_dir.name
    return name if "/" in name else f"{namespace or NAMESPACE_PLACEHOLDER}/{name}"


# --- the base model ---------------------------------------------------------------------------------


def is_local(config) -> bool:
    """Whether the base model is a file, a directory or one of alignprop's short names: not a hub repo id."""
    from alignprop.models import SHORT_NAMES

    base = config.pretrained.model
    return base in SHORT_NAMES or Path(base).expanduser().exists()


def base_licence(config) -> Licence:
    from alignprop.models import SHORT_NAMES

    base = config.pretrained.model
    if base in SHORT_NAMES:
        return OWN_MODELS_LICENCE
    return LICENCES.get(base, UNKNOWN_LICENCE)


def licence_text(config) -> str:
    licence, base = base_licence(config), config.pretrained.model
    if licence is UNKNOWN_LICENCE:
        return f"not known to alignprop: the licence of the base model `{base}` applies; check it before use"
    if licence is OWN_MODELS_LICENCE:
        return "MIT (the base model ships with alignprop)"
    named = f"[{licence.name}]({licence.link})" if licence.name else f"`{licence.license}`"
    return f"{named}, the base model's: this model is a derivative of `{base}` and carries its licence"


def pipeline_class(config) -> str:
    """The stock pipeline class of the base model: model_index.json's, read locally (a directory, the hub cache; a
    single file: its layout's), else the presets' known one; "DiffusionPipeline" when neither says."""
    from huggingface_hub import try_to_load_from_cache

    from alignprop.models import SINGLE_FILE_SUFFIXES, resolve_model_source

    base = config.pretrained.model
    source = config.pretrained.get("config", "") if base.endswith(SINGLE_FILE_SUFFIXES) else base
    try:
        source = resolve_model_source(source)
        index = Path(source, "model_index.json")
        if not index.is_file():
            index = try_to_load_from_cache(source, "model_index.json", revision=config.pretrained.revision)
        return json.loads(Path(index).read_text())["_class_name"]
    except Exception:  # written after training: an unreadable index only loses the class's name
        return KNOWN_PIPELINES.get(source, "StableDiffusionPipeline" if source == "" else "DiffusionPipeline")


def family_name(pipeline: str) -> str:
    """alignprop's family of a pipeline class ("sd", "sdxl", "sd3", "flux"); "sd" for one it does not know."""
    from alignprop.families import FAMILIES

    return next((family.name for family in FAMILIES if family.pipeline_class.__name__ == pipeline), "sd")


def base_lines(config, pipeline: str) -> tuple[list[str], str, str]:
    """(YAML metadata lines, the card's "base model" value, the Python line that loads the base pipeline `pipe`)."""
    from alignprop.models import INFERENCE_DTYPES, SINGLE_FILE_SUFFIXES, resolve_model_source

    precision = config.mixed_precision if config.mixed_precision in INFERENCE_DTYPES else "no"
    base, dtype = config.pretrained.model, str(INFERENCE_DTYPES[precision])  # e.g. "torch.bfloat16"
    metadata = base_licence(config).metadata()
    source = resolve_model_source(base)
    checker = ", safety_checker=None" if pipeline == "StableDiffusionPipeline" else ""
    if base.endswith(SINGLE_FILE_SUFFIXES):
        # A local file is no hub model id: no base_model metadata; its layout travels with it (pretrained.config).
        layout = config.pretrained.get("config", "")
        where = f', config="{resolve_model_source(layout)}"' if layout else ""
        value = f"`{base}` (a local single file; layout `{layout}`)" if layout else f"`{base}` (a local single file)"
        return metadata, value, f'pipe = {pipeline}.from_single_file("{source}"{where}, torch_dtype={dtype}{checker})'
    load = f'pipe = {pipeline}.from_pretrained("{source}", torch_dtype={dtype}{checker})'
    if is_local(config):
        return metadata, f"`{base}` (a local model, not on the hub: `{source}`)", load
    return [f"base_model: {base}", *metadata], f"[`{base}`](https://huggingface.co/{base})", load


# --- what was trained, and how it sampled -----------------------------------------------------------


def sampler_row(config, family: str) -> str:
    """The card's sampler: DDIM for a UNet model (as trained and evaluated), the model's own flow-matching Euler
    step (no eta) for a transformer model (SD3, FLUX), with FlowBP's sigma grid when `flow_sigmas` says so."""
    steps, guidance = config.steps, f"guidance {config.sd_guidance_scale:g}"
    if family in ("sd", "sdxl"):
        return f"DDIM (`DDIMScheduler` on the model's schedule), {steps} steps, eta {config.eta:g}, {guidance}"
    grid = "FlowBP's sigma grid" if config.get("flow_sigmas", "pipeline") == "flowbp" else "the pipeline's sigmas"
    embedded = " (embedded)" if family == "flux" else " (CFG)"
    return f"flow-matching Euler (`FlowMatchEulerDiscreteScheduler`, {grid}), {steps} steps, {guidance}{embedded}"


def gradient_row(config, family: str) -> str:
    """The gradient path and its settings (truncation: strategy and cut), as the run's start-up line says them."""
    from alignprop import paths

    return paths.from_config(config, family).summary()


def trained_lines(config, run_dir: Path) -> tuple[str, tuple[str, str], str, list[str]]:
    """(what the card's first line calls the weights, the card's row saying what trained, the diffusers class the
    snippet imports for them (empty: none), the Python lines that put them into `pipe` from the downloaded
    `folder`)."""
    from alignprop.denoiser_files import saved_class_name

    full = full_denoiser(run_dir)
    if full is None:
        lora = f"rank {config.lora.rank}, alpha {config.lora.alpha:g}, on {', '.join(config.lora.target_modules)}"
        return "A LoRA", ("LoRA", lora), "", ["pipe.load_lora_weights(folder)"]
    name, model_class = full.name, saved_class_name(full)
    load = f'pipe.{name} = {model_class}.from_pretrained(folder, subfolder="{name}", torch_dtype=pipe.dtype)'
    return (
        f"A fully fine-tuned {name}",
        ("fine-tuned", f"every weight of the {name} (train.finetune=full)"),
        model_class,
        [load],
    )


def final_evaluation(run_dir: Path) -> dict:
    """The summary.json of the run's last evaluation (RUN/eval/update_N/), {} when there is none."""
    found = sorted((run_dir / "eval").glob("update_*/summary.json"))
    return json.loads(found[-1].read_text()) if found else {}


def sample_lines(config, family: str, evaluation: dict) -> list[str]:
    """Python lines that regenerate the final evaluation's images with `pipe` (README "Use a checkpoint"): its
    prompts, latents (`eval_seeding`: one generator for all, or one per entry), batches, size and settings."""
    seed, seeding = evaluation.get("seed", config.seed), evaluation.get("eval_seeding", "sequential")
    tokens = config.pretrained.get("max_sequence_length", 0)
    extra = f", max_sequence_length={tokens}" if tokens else ""
    if family in ("sd", "sdxl"):
        extra = f", eta={config.eta:g}{extra}"
    if family == "sd3" and config.get("flow_sigmas", "pipeline") == "flowbp":
        extra += ", sigmas=numpy.linspace(1.0, 1 / steps, steps).tolist()"  # FlowBP's grid, before the shift
    settings = f"num_inference_steps=steps, guidance_scale={config.sd_guidance_scale:g}{extra}"
    if "resolution" not in evaluation:  # no evaluation was recorded: one prompt with the run's settings
        return ["", f"steps = {config.steps}", f'image = pipe("a prompt", {settings}).images[0]']
    height, width = evaluation["resolution"]
    denoiser = "unet" if family in ("sd", "sdxl") else "transformer"
    channels = f"pipe.{denoiser}.config.in_channels" + (" // 4" if family == "flux" else "")
    factor = "2 * (side // (pipe.vae_scale_factor * 2))" if family == "flux" else "side // pipe.vae_scale_factor"
    chunk = "latents[i : i + batch]"
    if family == "flux":  # FluxPipeline takes its latents packed 2x2 into tokens
        chunk = f"pipe._pack_latents({chunk}, len(chunk), *latents.shape[1:])"
    if seeding == "per_prompt":
        said = f"its own CPU generator seeded with {seed} + i"
        draw = [
            "generators = [torch.Generator().manual_seed(" + f"{seed} + i) for i in range(len(prompts))]",
            "latents = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators])",
        ]
    else:
        said = f"latent i of one CPU generator seeded with {seed}"
        draw = [f"latents = torch.randn(shape, generator=torch.Generator().manual_seed({seed}))"]
    return [
        "",
        f"# The final evaluation's images: prompt i on {said}.",
        f'prompts = Path(folder, "{PROMPTS_FILE}").read_text().splitlines()',
        f"steps, batch, height, width = {config.steps}, {config.train.batch_size_per_gpu_available}, {height}, {width}",
        f"shape = (len(prompts), {channels}, *({factor} for side in (height, width)))",
        *draw,
        "images = []",
        "for i in range(0, len(prompts), batch):",
        "    chunk = prompts[i : i + batch]",
        f"    start = {chunk}.to(pipe.device, pipe.dtype)",
        f"    images += pipe(chunk, latents=start, height=height, width=width, {settings}).images",
    ]


def card_rows(config, preset: str, run_dir: Path, updates: int, family: str, base: str) -> list[tuple[str, str]]:
    trained_row = trained_lines(config, run_dir)[1]
    evaluation = final_evaluation(run_dir)
    size = "x".join(str(side) for side in evaluation.get("resolution", [])) or "the model's native size"
    rows = [
        ("base model", base),
        ("licence", licence_text(config)),
        ("reward", f"`{config.reward_fn}` (loss `{config.get('reward_loss', 'reward')}`)"),
        ("gradient path", gradient_row(config, family)),
        ("samples per update", f"{config.train.total_batch_size}"),
        ("optimizer updates", str(updates)),
        ("training prompts / evaluation prompts", f"`{config.prompt_fn}` / `{config.eval_prompt_fn}`"),
        trained_row,
        ("sampler", sampler_row(config, family)),
        ("image size", f"{size} px, {config.mixed_precision} mixed precision"),
        ("learning rate", f"{config.train.learning_rate:g} ({config.train.lr_scheduler})"),
        ("seed", str(config.seed)),
        ("preset", f"`{preset}`" if preset else "(a config given in code)"),
    ]
    tokens = config.pretrained.get("max_sequence_length", 0)
    if tokens:
        rows.insert(-3, ("T5 prompt tokens", f"{tokens} (`max_sequence_length`)"))
    if evaluation:
        rows.append(("evaluation images", f"{evaluation.get('num_images')} (`{PROMPTS_FILE}`)"))
    return rows


def snippet(config, run_dir: Path, repo: str, pipeline: str, family: str) -> list[str]:
    """The card's Python: load the base, switch to the sampler the run used, add the weights, regenerate the final
    evaluation's images."""
    _, _, load = base_lines(config, pipeline)
    _, _, model_class, use = trained_lines(config, run_dir)
    ddim = family in ("sd", "sdxl")
    sample = sample_lines(config, family, final_evaluation(run_dir))
    classes = ", ".join(sorted({pipeline, *(["DDIMScheduler"] * ddim), *([model_class] if model_class else [])}))
    return [
        "from pathlib import Path",
        "",
        *(["import numpy"] if any("numpy." in line for line in sample) else []),
        "import torch",
        f"from diffusers import {classes}",
        "from huggingface_hub import snapshot_download",
        "",
        load,
        *(
            ["pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # trained and sampled with DDIM"]
            * ddim
        ),
        f'folder = snapshot_download("{repo}")  # this repository: the weights and {PROMPTS_FILE}',
        *use,
        'pipe.to("cuda" if torch.cuda.is_available() else "cpu")',
        *sample,
    ]


def card_text(config, preset: str, run_dir: Path, updates: int, before: dict, after: dict, namespace: str = "") -> str:
    """The model card: YAML metadata for the hub, then what was trained, how, how well, and how to sample."""
    repo, pipeline = repo_id(config, run_dir, namespace), pipeline_class(config)
    family = family_name(pipeline)
    metadata, base, _ = base_lines(config, pipeline)
    what = trained_lines(config, run_dir)[0]
    scores = [
        f"| {name} | {before[name]:.4g} | {after[name]:.4g} |"
        for name in after
        if name.endswith(("_mean", "_std")) and name in before and isinstance(after[name], float)
    ]
    precision = (
        " exactly (in 8 bits)"
        if config.mixed_precision == "no"
        else f" (the run sampled under {config.mixed_precision} autocast: close, not bit-equal)"
    )
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
            f"# {repo}",
            "",
            f"{what} for {base} fine-tuned with AlignProp (reward backpropagation through the sampling chain) "
            f"on the `{config.reward_fn}` reward.",
            "",
            "| setting | value |",
            "|---|---|",
            *(f"| {name} | {value} |" for name, value in card_rows(config, preset, run_dir, updates, family, base)),
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
            f"The snippet regenerates the final evaluation's images{precision}.",
            "",
            "```python",
            *snippet(config, run_dir, repo, pipeline, family),
            "```",
            "",
        ]
    )


# --- writing and uploading --------------------------------------------------------------------------


def write_folder(
    config, preset: str, run_dir: Path, updates: int, before: dict, after: dict, namespace: str = ""
) -> Path:
    """RUN/hub/: README.md (the card), the LoRA file(s) or the denoiser's folder, the before/after grid and the
    final evaluation's prompts."""
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
    evaluation = final_evaluation(run_dir)
    if evaluation:
        (folder / PROMPTS_FILE).write_text("".join(f"{image['prompt']}\n" for image in evaluation["images"]))
    (folder / "README.md").write_text(card_text(config, preset, run_dir, updates, before, after, namespace))
    return folder


def logged_in_namespace() -> str:
    """The logged-in user's name (the namespace a bare repo id goes to); raises without network or login."""
    from huggingface_hub import HfApi

    return HfApi().whoami()["name"]


def upload(folder: Path, repo: str) -> str:
    """Create the repo (if needed) and upload the folder; returns the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message="AlignProp fine-tuning")
    return str(url)


def upload_command(repo: str, folder: Path) -> str:
    """The exact `hf upload` command that sends the folder later (huggingface_hub's CLI)."""
    import shlex

    return f"hf upload {shlex.quote(repo)} {shlex.quote(str(folder))}"


def not_uploaded(repo: str, folder: Path, why: str) -> str:
    placeholder = f" (replace {NAMESPACE_PLACEHOLDER} here and in README.md)" if NAMESPACE_PLACEHOLDER in repo else ""
    return (
        f"push_to_hub: not uploaded ({why}); model card and weights are in {folder}; upload them with: "
        f"{upload_command(repo, folder)}{placeholder}"
    )


def publish(
    config,
    preset: str,
    run_dir: Path,
    updates: int,
    before: dict,
    after: dict,
    uploader: Callable | None = None,
    who: Callable[[], str] = logged_in_namespace,
) -> tuple[str, bool]:
    """Write RUN/hub/ and upload it; returns (the one line to print: where it went, or why not and the command that
    uploads it; whether it was uploaded)."""
    from huggingface_hub import constants

    reason, namespace = "offline: HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "", ""
    if not reason and "/" not in config.hub_model_id:
        try:
            namespace = who()
        except Exception as error:  # no network, not logged in: the card names the placeholder namespace
            reason = failure(error)
    folder = write_folder(config, preset, run_dir, updates, before, after, namespace)
    repo = repo_id(config, run_dir, namespace)
    if reason:
        return not_uploaded(repo, folder, reason), False
    try:
        url = (uploader or upload)(folder, repo)
    except Exception as error:  # no network, no write access: the folder stays for later
        return not_uploaded(repo, folder, failure(error)), False
    return f"push_to_hub: uploaded {folder} to {url}", True


def failure(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:120]}"
