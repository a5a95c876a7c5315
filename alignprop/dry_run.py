"""`--config.dry_run=True`: every file a run would read, found or not, without loading, downloading or writing.

The model (a short name of ours, a local diffusers directory or single file, or a hub id looked up in the local
Hugging Face cache with `try_to_load_from_cache`, never on the network), the reward's weights and the prompt
files. A hub pipeline is listed component by component once its `model_index.json` is cached; before that only
`model_index.json` itself can be named. A single file comes with its pipeline layout (`pretrained.config`, or the
hub repo diffusers infers from the file's keys): model_index.json and its components' configs, not their weights.
When the model_index.json of one of the presets' models is not cached yet, its components come from the pipeline
class alignprop knows it by (`hub_repos.KNOWN_PIPELINES`).

Then how to get what is missing: one `hf download REPO --include ...` command per repository, fetching exactly the
files listed (the safetensors weights, sharded or not, never the .bin copies, fp16 variants or a model's
single-file checkpoint beside its folders), with a note for gated repositories. Sizes are those of the files found;
a missing file's size is not known offline, except a sharded checkpoint's whose index is cached (its
`metadata.total_size`); `hf download ... --dry-run` says every size once online. Last, the run's arithmetic:
samples, updates, and the denoiser calls per sample with and without gradient (`jobs.describe_plan`).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from alignprop import prompts
from alignprop.errors import UserError
from alignprop.hub_repos import KNOWN_PIPELINES, gated_note

# Weight files a component may have, in the order the loaders look for them (a sharded checkpoint: its index).
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
INDEX_SUFFIX = ".safetensors.index.json"
# Files a tokenizer reads beside the one that names it (transformers skips them when absent).
COMPANIONS = {"vocab.json": ("merges.txt",), "tokenizer_config.json": ("special_tokens_map.json",)}
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
    repo: str = ""  # the hub repository it is downloaded from ("" for a local or shipped file)
    revision: str = ""  # the repository's revision the run asks for ("" for the default branch)
    patterns: tuple[str, ...] = ()  # what `hf download repo --include ...` fetches it by
    known_size: int | None = None  # bytes known without one file to stat: a sharded checkpoint's, from its index

    @property
    def present(self) -> bool:
        return self.built_in or self.path is not None

    @property
    def size(self) -> int | None:
        if self.known_size is not None:
            return self.known_size
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


def first_found(what: str, source: str, candidates: tuple[str, ...], revision: str | None = None, patterns=()) -> Need:
    """One need satisfied by any of `candidates` (e.g. safetensors, sharded or not, or bin weights); named by the
    first. `patterns`: what downloads it (default: `download_patterns(candidates)`)."""
    origin = {
        "repo": hub_repo(source),
        "revision": revision or "",
        "patterns": patterns or download_patterns(candidates),
    }
    for filename in candidates:
        path = local_or_cached(source, filename, revision)
        if path is not None and filename.endswith(INDEX_SUFFIX):
            return sharded(what, source, filename, path, revision, origin)
        if path is not None:
            return Need(what, f"{source}: {filename}", path, where(source), **origin)
    return Need(what, f"{source}: {candidates[0]}", None, where(source), **origin)


def sharded(what: str, source: str, index_name: str, index: Path, revision: str | None, origin: dict) -> Need:
    """A sharded checkpoint: found when every shard its index names is; its size, the shards' (the cached index's
    total_size while shards are missing)."""
    try:
        listed = json.loads(index.read_text())
        shard_names, total = sorted(set(listed["weight_map"].values())), listed.get("metadata", {}).get("total_size")
    except (OSError, ValueError, KeyError, AttributeError):
        return Need(what, f"{source}: {index_name} (unreadable)", None, where(source), **origin)
    folder = index_name.rpartition("/")[0]
    shards = [local_or_cached(source, f"{folder}/{name}" if folder else name, revision) for name in shard_names]
    missing = sum(shard is None for shard in shards)
    if missing:
        name = f"{source}: {index_name} ({missing} of {len(shards)} shards missing)"
        size = total - sum(shard.stat().st_size for shard in shards if shard) if isinstance(total, int) else None
        return Need(what, name, None, where(source), known_size=size, **origin)
    size = sum(shard.stat().st_size for shard in shards)
    return Need(what, f"{source}: {index_name}", index, where(source), known_size=size, **origin)


def download_patterns(candidates: tuple[str, ...]) -> tuple[str, ...]:
    """The `hf download --include` patterns of one need: safetensors weights whole or sharded (not the .bin copy,
    not an fp16 variant: `name.fp16.safetensors` matches neither pattern), or the files by name with the ones a
    tokenizer reads beside them."""
    first = candidates[0]
    if first.endswith(".safetensors"):
        stem = first.removesuffix(".safetensors")
        return (f"{stem}.safetensors*", f"{stem}-*.safetensors")
    folder = first.rpartition("/")[0]
    names = [name.rpartition("/")[2] for name in candidates]
    names += [companion for name in names for companion in COMPANIONS.get(name, ())]
    return tuple(f"{folder}/{name}" if folder else name for name in names)


def hub_repo(source: str) -> str:
    """`source` as a hub repository id, "" when it is a local path."""
    return "" if Path(source).expanduser().exists() else source


def where(source: str) -> str:
    return "hub cache" if hub_repo(source) else "local"


def component_files(component: str, library: str) -> list[tuple[str, ...]]:
    """The files a pipeline component loads: its config(s), then its weights (any one of the candidates)."""
    if component in CONFIG_FILES:
        return [tuple(f"{component}/{name}" for name in candidates) for candidates in CONFIG_FILES[component]]
    weights = DIFFUSERS_WEIGHTS if library == "diffusers" else TRANSFORMERS_WEIGHTS
    return [(f"{component}/config.json",), tuple(f"{component}/{name}" for name in weights)]


def component_needs(what: str, source: str, component: str, library: str, revision: str, weights=True) -> list[Need]:
    """A component's needs; a folder of small files (tokenizer, scheduler) is downloaded whole."""
    files = component_files(component, library)
    if component in CONFIG_FILES:
        return [first_found(what, source, candidates, revision, (f"{component}/*",)) for candidates in files]
    return [first_found(what, source, candidates, revision) for candidates in (files if weights else files[:1])]


def pipeline_components(index: dict) -> dict[str, str]:
    """The components a run loads, by name -> library, from a model_index.json (or `known_index`'s stand-in).
    What the family passes as None is never loaded (SD1.x: the safety checker); image encoders never are."""
    from alignprop.families import family_class

    skipped = {"safety_checker", "feature_extractor", "image_encoder"}
    try:
        family = family_class(index.get("_class_name", ""))
        skipped = {name for name, value in family.load_kwargs.items() if value is None} | {"image_encoder"}
    except Exception:
        pass
    return {
        component: spec[0]
        for component, spec in sorted(index.items())
        if not component.startswith("_") and component not in skipped and isinstance(spec, list) and spec[0]
    }


def pipeline_index(index_need: Need, source: str) -> dict | None:
    """The model_index.json `index_need` found, else `known_index(source)` (None: neither is there)."""
    return json.loads(index_need.path.read_text()) if index_need.present else known_index(source)


def known_index(repo: str) -> dict | None:
    """A stand-in for the model_index.json of a preset's model not cached yet: the components its pipeline class
    takes. A feature extractor only with a safety checker (the SD1.x/2.x repositories carry one; the newer ones
    list none)."""
    if repo not in KNOWN_PIPELINES:
        return None
    import diffusers

    pipeline = getattr(diffusers, KNOWN_PIPELINES[repo])
    components = set(pipeline._get_signature_keys(pipeline)[0])
    if "safety_checker" not in components:
        components -= {"feature_extractor"}
    library = lambda name: "transformers" if name.startswith(("text_encoder", "safety")) else "diffusers"  # noqa: E731
    return {"_class_name": pipeline.__name__, **{name: [library(name), ""] for name in sorted(components)}}


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
    needs = [first_found("model", model, ("model_index.json",), revision)]
    index = pipeline_index(needs[0], model)
    if index is None:
        return needs  # the components are named by model_index.json
    for component, library in pipeline_components(index).items():
        needs += component_needs("model", model, component, library, revision)
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
    index_need = first_found(what, layout, ("model_index.json",), revision)
    needs = [replace(index_need, note=note + index_need.note)]
    index = pipeline_index(index_need, layout)
    if index is None:
        return needs
    for component, library in pipeline_components(index).items():
        needs += component_needs(what, layout, component, library, revision, weights=False)  # weights: the file
    return needs


def weights_file(what: str, local_path: str, repo: str, filename: str) -> Need:
    if local_path:
        path = Path(local_path).expanduser()
        return Need(what, local_path, path if path.is_file() else None, "local")
    return Need(what, f"{repo}: {filename}", cached(repo, filename), "hub cache", repo=repo, patterns=(filename,))


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
        size = human_size(need.size) + ("" if need.present or need.size is None else " to download")
        detail = ", ".join(filter(None, (need.note, size)))
        lines.append(f"  {status}  {need.what:<{width}}  {need.name}" + (f"  ({detail})" if detail else ""))
    return "\n".join(lines)


def download_commands(needs: list[Need]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(repo, revision, include patterns) for each hub repository a missing file comes from: every file the run
    reads from it (hf download skips what is cached), in the order listed."""
    wanted = {(need.repo, need.revision) for need in needs if need.repo and not need.present}
    patterns: dict[tuple[str, str], list[str]] = {}
    for need in needs:
        if (need.repo, need.revision) in wanted:
            listed = patterns.setdefault((need.repo, need.revision), [])
            listed += [pattern for pattern in need.patterns if pattern not in listed]
    return [(repo, revision, tuple(listed)) for (repo, revision), listed in patterns.items()]


def command_text(repo: str, revision: str, patterns: tuple[str, ...]) -> str:
    """One `hf download` command, continued over lines of a few patterns each (a shell reads it as one)."""
    words = ["hf", "download", repo, *(["--revision", revision] if revision not in ("", "main") else [])]
    parts = [shlex.join(words)] + [shlex.join(["--include", pattern]) for pattern in patterns]
    lines, line = [], ""
    for part in parts:
        if line and len(line) + len(part) > 100:
            lines.append(line)
            line = "    "
        line += (" " if line.strip() else "") + part
    return " \\\n".join([*lines, line])


def download_report(needs: list[Need]) -> str:
    lines = []
    for repo, revision, patterns in download_commands(needs):
        note = gated_note(repo)
        lines += [f"  # {note}"] if note else []
        lines += [f"  {line}" for line in command_text(repo, revision, patterns).splitlines()]
    if lines:
        lines.insert(
            0, "to download what is missing (add --dry-run to see the sizes first; local files: the config's paths):"
        )
    return "\n".join(lines)


def model_family(config, needs: list[Need]) -> tuple[str, str]:
    """The model's family name and denoiser attribute, from its model_index.json when there, else as alignprop
    knows the model ("" and "unet" when unknown: the arithmetic then assumes classifier-free guidance)."""
    from alignprop.families import family_class
    from alignprop.models import SHORT_NAME_FAMILIES

    model = config.pretrained.model
    index = next((need.path for need in needs if need.name.endswith(": model_index.json") and need.present), None)
    try:
        name = json.loads(index.read_text())["_class_name"] if index else KNOWN_PIPELINES.get(model, "")
        family = family_class(name) if name else None
    except (OSError, ValueError, KeyError, UserError):
        family = None
    if family is None:
        return SHORT_NAME_FAMILIES.get(model, ""), "unet"
    return family.name, family.denoiser_name


def plan_report(config, needs: list[Need]) -> str:
    """The training run's arithmetic (`jobs.describe_plan`), an evaluation's size, or why it cannot be worked out
    yet."""
    from alignprop import evaluate, jobs, runtime
    from alignprop.batching import plan_batches

    if config.soup_inference or config.get("eval_all_checkpoints"):
        return ""  # their size depends on the soup's points / the run's checkpoints: the run says it
    try:
        if config.only_eval:
            images = len(evaluate.evaluation_prompts(config))
            return (
                f"the evaluation: {images:,} images ({config.eval_prompt_fn}, {config.eval_prompts}), {config.steps} "
                f"sampler steps each ({images * config.steps:,} image-steps, without gradient)"
            )
        batches = plan_batches(config.train, runtime.process_count())
        first = jobs.resumed_epochs(config) if config.resume_from else 0
        return "\n".join(
            [
                "the run:",
                *(f"  {line}" for line in jobs.describe_plan(config, batches, first, *model_family(config, needs))),
            ]
        )
    except UserError as error:
        return f"the run: not worked out ({error})"


def dry_run(config, preset: str = "") -> int:
    """Print what the run needs, what is missing and how to download it, and the run's arithmetic; raise UserError
    (one line) when something is missing.

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
    for section in (download_report(needs), plan_report(config, needs)):
        if section:
            print(section)
    if missing:
        total = sum(need.size or 0 for need in needs if need.present)
        raise UserError(
            f"dry run: {len(missing)} of {len(needs)} file(s) missing (listed above; {human_size(total)} found); "
            "download them with the commands above or point the config at local files"
        )
    jobs.prepare(config, runtime.process_count())  # every other check a run makes before writing anything
    print(f"dry run: all {len(needs)} file(s) found and the config is valid; nothing was written")
    return 0
