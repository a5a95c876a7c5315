"""`--config.dry_run=True`: every file a run would read, found or not, without loading, downloading or writing.

The model (a short name of ours, a local diffusers directory or single file, or a hub id looked up in the local
Hugging Face cache with `try_to_load_from_cache`, never on the network), the reward's weights and the prompt
files. A hub pipeline is listed component by component once its `model_index.json` is cached; before that only
`model_index.json` itself can be named. A single file comes with its pipeline layout (`pretrained.config`, or the
hub repo diffusers infers from the file's keys): model_index.json and its components' configs, not their weights.
Sizes are those of the files found (a missing file's size is not known offline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alignprop import prompts
from alignprop.errors import UserError

# Weight files a component may have, in the order the loaders look for them.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# A tokenizer is its config plus a fast tokenizer.json or the slow vocab.json (+ merges.txt).
TOKENIZER_FILES = [("tokenizer_config.json",), ("tokenizer.json", "vocab.json")]
CONFIG_FILES = {  # components without weights: each entry is one need, satisfied by any of its candidates
    "scheduler": [("scheduler_config.json",)],
    "tokenizer": TOKENIZER_FILES,
    "tokenizer_2": TOKENIZER_FILES,
    "tokenizer_3": TOKENIZER_FILES,
    "feature_extractor": [("preprocessor_config.json",)],
}
CLIP_PROCESSOR_FILES = [("preprocessor_config.json",)]
BERT_TOKENIZER_FILES = [("tokenizer_config.json",), ("tokenizer.json", "vocab.txt")]


@dataclass(frozen=True)
class Need:
    what: str  # e.g. "model", "reward aesthetic: CLIP", "prompts"
    name: str  # the file as a person would name it: hub id + path in the repo, or a local path
    path: Path | None  # where it is, None when missing
    note: str = ""  # e.g. "shipped", "hub cache"
    built_in: bool = False  # a short name of ours: made by alignprop, no file to find

    @property
    def present(self) -> bool:
        return self.built_in or self.path is not None

    @property
    def size(self) -> int | None:
        return self.path.stat().st_size if self.path is not None and self.path.is_file() else None


def human_size(size: int | None) -> str:
    if size is None:
        return ""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def cached(repo: str, filename: str, revision: str | None = None) -> Path | None:
    """The file from the local hub cache (no network), None when it is not there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename, revision=revision)
    except Exception:  # not a valid repo id, ...: not cached either
        return None
    return Path(found) if isinstance(found, str) else None


def local_or_cached(source: str, filename: str, revision: str | None = None) -> Path | None:
    directory = Path(source).expanduser()
    if directory.is_dir():
        path = directory / filename
        return path if path.is_file() else None
    return cached(source, filename, revision)


def first_found(what: str, source: str, candidates: tuple[str, ...], revision: str | None = None) -> Need:
    """One need satisfied by any of `candidates` (e.g. safetensors or bin weights); named by the first."""
    for filename in candidates:
        path = local_or_cached(source, filename, revision)
        if path is not None:
            return Need(what, f"{source}: {filename}", path, where(source))
    return Need(what, f"{source}: {candidates[0]}", None, where(source))


def where(source: str) -> str:
    return "local" if Path(source).expanduser().exists() else "hub cache"


def component_files(component: str, library: str) -> list[tuple[str, ...]]:
    """The files a pipeline component loads: its config(s), then its weights (any one of the candidates)."""
    if component in CONFIG_FILES:
        return [tuple(f"{component}/{name}" for name in candidates) for candidates in CONFIG_FILES[component]]
    weights = DIFFUSERS_WEIGHTS if library == "diffusers" else TRANSFORMERS_WEIGHTS
    return [(f"{component}/config.json",), tuple(f"{component}/{name}" for name in weights)]


def model_needs(model: str, revision: str, layout: str = "") -> list[Need]:
    """The model's files; `layout`: pretrained.config, the pipeline layout of a single-file model."""
    from alignprop.models import SHORT_NAMES, SINGLE_FILE_SUFFIXES, check_model_name

    check_model_name(model)  # a retired id or a local path that does not exist: one line, as in a run
    if model in SHORT_NAMES:
        return [Need("model", model, None, "shipped with or built by alignprop", built_in=True)]
    path = Path(model).expanduser()
    if path.is_file():
        found = path if path.suffix in SINGLE_FILE_SUFFIXES else None
        return [Need("model", f"{model} (single file)", found, "local"), *layout_needs(path, layout, revision)]
    index = local_or_cached(model, "model_index.json", revision)
    needs = [Need("model", f"{model}: model_index.json", index, where(model))]
    if index is None:
        return needs  # the components are named by model_index.json
    from alignprop.families import family_class

    components = json.loads(index.read_text())
    skipped = {"safety_checker", "feature_extractor", "image_encoder"}
    try:  # what the family passes as None is never loaded (SD1.x: the safety checker)
        family = family_class(components.get("_class_name", ""))
        skipped = {name for name, value in family.load_kwargs.items() if value is None} | {"image_encoder"}
    except Exception:
        pass
    for component, spec in sorted(components.items()):
        if component.startswith("_") or component in skipped or not isinstance(spec, list) or spec[0] is None:
            continue
        for candidates in component_files(component, spec[0]):
            needs.append(first_found("model", model, candidates, revision))
    return needs


def layout_needs(path: Path, layout: str, revision: str) -> list[Need]:
    """A single file's pipeline layout: model_index.json and the configs of its components (their weights come
    from the file). Without pretrained.config, the hub repo diffusers infers from the file (offline: its cache)."""
    from alignprop.models import SHORT_NAMES, SINGLE_FILE_CONFIG_OPTION, inferred_layout

    what = "model: layout"
    if layout in SHORT_NAMES:
        return [Need(what, layout, None, "built by alignprop", built_in=True)]
    note = ""
    if not layout:
        layout, note = inferred_layout(path) or "", "inferred from the file by diffusers; "
        if not layout:
            return [Need(what, f"(unknown: give {SINGLE_FILE_CONFIG_OPTION}=DIR)", None)]
    index = local_or_cached(layout, "model_index.json", revision)
    needs = [Need(what, f"{layout}: model_index.json", index, note + where(layout))]
    if index is None:
        return needs
    for component, spec in sorted(json.loads(index.read_text()).items()):
        if component.startswith("_") or component == "safety_checker" or not isinstance(spec, list) or not spec[0]:
            continue
        files = component_files(component, spec[0])
        for candidates in files if component in CONFIG_FILES else files[:1]:  # a network's weights: from the file
            needs.append(first_found(what, layout, candidates, revision))
    return needs


def weights_file(what: str, local_path: str, repo: str, filename: str) -> Need:
    if local_path:
        path = Path(local_path).expanduser()
        return Need(what, local_path, path if path.is_file() else None, "local")
    return Need(what, f"{repo}: {filename}", cached(repo, filename), "hub cache")


def clip_needs(what: str, model: str, processor: str, tokenizer: bool) -> list[Need]:
    needs = [first_found(what, model, ("config.json",)), first_found(what, model, TRANSFORMERS_WEIGHTS)]
    source = processor or model
    files = CLIP_PROCESSOR_FILES + (TOKENIZER_FILES if tokenizer else [])
    return needs + [first_found(what, source, candidates) for candidates in files]


def reward_needs(name: str, config) -> list[Need]:
    from alignprop.rewards.aesthetic import SHIPPED_HEAD
    from alignprop.rewards.hps import checkpoint_filename

    options = config.rewards
    what = f"reward {name}"
    if name == "aesthetic":
        head = options.aesthetic
        if head.head_path or head.head_repo:
            head_need = weights_file(f"{what}: head", head.head_path, head.head_repo, head.head_filename)
        else:
            shipped = SHIPPED_HEAD if SHIPPED_HEAD.is_file() else None
            head_need = Need(f"{what}: head", str(SHIPPED_HEAD), shipped, "shipped")
        return [head_need, *clip_needs(f"{what}: CLIP", head.clip_model, head.processor, tokenizer=False)]
    if name == "hps":
        hps = options.hps
        return [weights_file(f"{what}: checkpoint", hps.checkpoint, hps.repo, checkpoint_filename(hps.version))]
    if name in ("pickscore", "clip_score"):
        section = options[name]
        return clip_needs(f"{what}: CLIP", section.model, section.processor, tokenizer=True)
    if name == "imagereward":
        from alignprop.rewards.imagereward import CHECKPOINT_FILE, MED_CONFIG_FILE

        ir = options.imagereward
        return [
            weights_file(f"{what}: checkpoint", ir.checkpoint, ir.repo, CHECKPOINT_FILE),
            weights_file(f"{what}: med_config", ir.med_config, ir.repo, MED_CONFIG_FILE),
            *(first_found(f"{what}: tokenizer", ir.tokenizer, files) for files in BERT_TOKENIZER_FILES),
        ]
    if name == "combined":
        from alignprop.rewards.combined import parse_combination

        return [need for part in parse_combination(options.combination) for need in reward_needs(part, config)]
    if name.startswith("toyworld"):
        from alignprop.toyworld.rewards import CLASSIFIER_FILE

        if name != "toyworld_shape":
            return []
        file = Path(options.toyworld.classifier).expanduser() if options.toyworld.classifier else CLASSIFIER_FILE
        return [Need(f"{what}: classifier", str(file), file if file.is_file() else None, "shipped")]
    return []  # computed from the pixels: nothing to read


def prompt_needs(config) -> list[Need]:
    needs = []
    for key in ("prompt_fn", "eval_prompt_fn"):
        name = config[key]
        try:
            prompts.load_prompts(name)
            note = "shipped" if name in prompts.BUILTIN else "local"
            needs.append(Need(f"prompts ({key})", name, prompt_path(name), note))
        except UserError as error:
            needs.append(Need(f"prompts ({key})", f"{name} ({error})", None))
    return needs


def prompt_path(name: str) -> Path:
    if name in prompts.BUILTIN:
        return prompts.BUILTIN[name]
    return Path(name.removeprefix(prompts.FROM_FILE)).expanduser()


def needs_of(config) -> list[Need]:
    """Everything the run described by `config` reads from disk or the hub."""
    needs = model_needs(config.pretrained.model, config.pretrained.revision, config.pretrained.get("config", ""))
    vae = config.pretrained.vae  # another AutoencoderKL replacing the pipeline's (e.g. an fp16-safe one)
    if vae:
        needs += [first_found("model: vae", vae, ("config.json",)), first_found("model: vae", vae, DIFFUSERS_WEIGHTS)]
    needs += reward_needs(config.reward_fn, config)
    from alignprop.rewards.registry import listed_rewards

    for name in dict.fromkeys(listed_rewards(config.eval_reward_fns)):
        if name != config.reward_fn:  # held-out rewards (eval_reward_fns), each read as it would be as reward_fn
            needs += reward_needs(name, config)
    return needs + prompt_needs(config)


def report(needs: list[Need]) -> str:
    width = max(len(need.what) for need in needs)
    lines = []
    for need in needs:
        status = "found  " if need.present else "MISSING"
        detail = ", ".join(filter(None, (need.note, human_size(need.size))))
        lines.append(f"  {status}  {need.what:<{width}}  {need.name}" + (f"  ({detail})" if detail else ""))
    return "\n".join(lines)


def dry_run(config, preset: str = "") -> int:
    """Print what the run needs and what is missing; raise UserError (one line) when something is missing.

    Config errors are reported as in a run (the schema first; once every file is there, the whole validation).
    Nothing is written, loaded or downloaded.
    """
    from alignprop import jobs, quantization, runtime, schema

    schema.check(config)
    needs = needs_of(config)
    print(f"dry run{f' of {preset}' if preset else ''}: files the run reads (nothing is written or downloaded)")
    print(report(needs))
    if quantization.describe(config):
        print(f"  {quantization.describe(config)}")
    missing = [need for need in needs if not need.present]
    if missing:
        total = sum(need.size or 0 for need in needs if need.present)
        raise UserError(
            f"dry run: {len(missing)} of {len(needs)} file(s) missing (listed above; {human_size(total)} found); "
            "download them once online (hf download <id>) or point the config at local files"
        )
    jobs.prepare(config, runtime.process_count())  # every other check a run makes before writing anything
    print(f"dry run: all {len(needs)} file(s) found and the config is valid; nothing was written")
    return 0
