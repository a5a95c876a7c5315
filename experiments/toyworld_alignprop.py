"""AlignProp on the toy world, in the spirit of the paper's tables; CPU, about 5 minutes on one thread.

    .venv/bin/python -m experiments.toyworld_alignprop --threads 1 --out logs/toyworld/experiment

Every fine-tuning run is the project's training loop (`alignprop.train.Trainer`) on the `tiny` preset (the
CPU demo) with this script's arguments; each writes a normal run directory under OUT/runs/. `--preset tiny_flow`
runs the same study on the flow-matching toy model (its preset's model, sampling steps and guidance).

1. Fine-tunes LoRAs of the shipped toy pipeline on the *learned* shape reward with three truncation
   strategies (fixed K=1, per_step_uniform, full) and reports, before and after, the learned reward and
   the ground-truth checker's accuracies on the training captions and on held-out colour-shape pairs.
2. Fine-tunes on the area and colour rewards and shows what the checker says about each.
3. Sweeps a parameter soup between the shape LoRA and the area LoRA.
Writes results.json, results.md (the tables), curves_reward.png / curves_checker.png and grid.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from ml_collections import ConfigDict

from alignprop import models
from alignprop import rewards as rewards_registry
from alignprop.families import family_of
from alignprop.jobs import shared_run_dir
from alignprop.lora_files import read_lora
from alignprop.presets import load_preset
from alignprop.runtime import validate
from alignprop.soup import Soup, SoupInputs
from alignprop.toyworld.captions import parse
from alignprop.toyworld.control import generate, grade
from alignprop.toyworld.figures import curves, image_grid, running_mean
from alignprop.toyworld.splits import split_captions
from alignprop.train import Trainer

EVAL_SEED = 2024  # evaluation latents: the same for every model
SOUP_COEFFICIENTS = (0.0, 0.25, 0.5, 0.75, 1.0)
GRID_PROMPTS = 8  # columns of the before/after grid: half training captions, half held-out
CURVE_WINDOW = 5  # updates averaged in the curves (each point is one batch of 16)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("logs/toyworld/experiment"))
    parser.add_argument("--preset", default="tiny", choices=("tiny", "tiny_flow"), help="the demo preset to start from")
    parser.add_argument("--model", default=None, help="default: the preset's (the shipped toy model)")
    parser.add_argument("--updates", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps; default: the preset's (tiny: 20)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=4)
    # The preset's guidance (both demos: 1, classifier-free guidance off): with guidance 5 the shipped model already
    # draws the right shape ~100% of the time; without it, ~83%, which leaves the learned shape reward something to fix.
    parser.add_argument("--guidance", type=float, default=None, help="default: the preset's (tiny: 1)")
    parser.add_argument("--eval-repeats", type=int, default=2, help="evaluation images per caption")
    parser.add_argument("--area-target", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-soup", action="store_true")
    return with_preset_defaults(parser.parse_args(argv))


def with_preset_defaults(args):
    """Model, sampling steps and guidance not given: the preset's."""
    preset = load_preset(args.preset)
    args.model = args.model or preset.pretrained.model
    args.steps = args.steps or preset.steps
    args.guidance = preset.sd_guidance_scale if args.guidance is None else args.guidance
    args.tokens = preset.pretrained.max_sequence_length
    return args


def sampling(args) -> dict:
    """`control.generate`'s sampling settings: the preset's (or the command line's)."""
    return {"steps": args.steps, "guidance": args.guidance, "tokens": args.tokens}


def build_reward(name: str, **options):
    config = load_preset("tiny")
    config.reward_fn = name
    config.rewards.toyworld.update(options)
    return rewards_registry.build_reward(config, torch.device("cpu"), torch.float32)


def grid_title(prompt: str, held_out: bool) -> str:
    request = parse(prompt)
    return f"{request.colour} {request.shape}\non {request.background}" + ("\n(held-out)" if held_out else "")


def evenly_spaced(items: list, count: int) -> list:
    return [items[i * len(items) // count] for i in range(count)]


TRUNCATIONS = {"fixed K=1": "fixed", "per_step_uniform": "per_step_uniform", "full": "full"}  # label -> strategy


def measure(pipeline, rewards: dict, prompts: list[str], args) -> tuple[dict, torch.Tensor]:
    """Checker accuracies and mean rewards on fixed latents; also returns the images."""
    images = generate(pipeline, prompts, EVAL_SEED, **sampling(args))
    summary = {f"checker_{k}": v for k, v in grade(images, prompts).items()}
    with torch.no_grad():
        for name, reward in rewards.items():
            result = reward.score(images, prompts)
            summary[name] = result.reward.mean().item()
            summary.setdefault("checker_area", result.metrics["checker_area"].mean().item())
    return summary, images


def evaluate_splits(pipeline, rewards, splits, args) -> tuple[dict, dict]:
    results, images = {}, {}
    for split, captions in splits.items():
        results[split], images[split] = measure(pipeline, rewards, captions * args.eval_repeats, args)
    return results, images


def training_config(args, label: str, reward_name: str, strategy: str) -> ConfigDict:
    """The demo preset (`tiny` or `tiny_flow`) with this experiment's settings: one epoch of `updates` updates."""
    config = load_preset(args.preset)
    config.pretrained.model = args.model
    config.logdir, config.run_name, config.seed = str(args.out / "runs"), label, args.seed
    config.reward_fn = reward_name
    config.rewards.toyworld.area_target = args.area_target
    config.steps, config.sd_guidance_scale = args.steps, args.guidance
    config.truncation_strategy = strategy
    config.truncated_backprop_minmax = (0, args.steps)
    config.trunc_backprop_timestep = args.steps - 1  # fixed: only the last step keeps its gradient (K=1)
    config.train.learning_rate = args.lr
    config.lora.rank = config.lora.alpha = args.lora_rank
    config.train.total_batch_size = config.train.batch_size_per_gpu_available = args.batch_size
    config.train.total_samples_per_epoch = args.batch_size * args.updates
    config.num_epochs, config.save_freq, config.vis_freq = 1, 0, 0
    return config


def train_lora(args, reward_name: str, strategy: str, label: str, **overrides) -> tuple:
    """Train one LoRA with the training loop; (pipeline with the LoRA, one record per update, LoRA dir).
    `overrides`: more top-level config values (e.g. gradient_path)."""
    config = training_config(args, label, reward_name, strategy)
    config.update(overrides)
    print(f"-- {label}: {args.updates} updates", flush=True)
    trainer = Trainer(config, validate(config, num_processes=1), shared_run_dir(config))
    trainer.fit()
    metrics = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [record for record in map(json.loads, metrics) if "loss" in record]  # the training updates
    return trainer.model.pipeline, records, trainer.run_dir / "lora"


def soup_sweep(args, path_a: Path, path_b: Path, rewards, prompts) -> list[dict]:
    """Parameter soup c*A + (1-c)*B (the original's mode) at each coefficient, on the training captions."""
    pipeline = models.load_pipeline(args.model)
    inputs = SoupInputs(read_lora(path_a), read_lora(path_b), "params", SOUP_COEFFICIENTS)
    soup, rows = Soup(family_of(pipeline).denoiser, inputs), []
    for coefficient in SOUP_COEFFICIENTS:
        soup.set_coefficient(coefficient)
        summary, _ = measure(pipeline, rewards, prompts, args)
        rows.append({"coefficient": coefficient, **summary})
        print(f"   soup c={coefficient}: {summary}", flush=True)
    return rows


def truncation_table(results: dict) -> list[str]:
    base = results["base"]
    lines = [
        "| truncation | s/update | learned reward (train) | checker shape (train) | checker all 3 (train) "
        "| checker area (train) | learned reward (held-out) | checker shape (held-out) | checker all 3 (held-out) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    train_keys = ("toyworld_shape", "checker_shape", "checker_prompt", "checker_area")
    heldout_keys = ("toyworld_shape", "checker_shape", "checker_prompt")
    for name, run in results["runs"].items():
        cells = [change(base["train"], run["after"]["train"], key) for key in train_keys]
        cells += [change(base["heldout"], run["after"]["heldout"], key) for key in heldout_keys]
        lines.append(f"| {name} | {run['seconds_per_update']:.1f} | {' | '.join(cells)} |")
    return lines


def change(before: dict, after: dict, key: str) -> str:
    return f"{before[key]:.2f} → {after[key]:.2f}"


def rewards_table(results: dict) -> list[str]:
    base = results["base"]["train"]
    lines = [
        "| reward (per_step_uniform) | its value (train) | checker background | checker colour | checker shape "
        "| checker all 3 | checker area |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, after in results["rewards"].items():
        keys = ("checker_background", "checker_colour", "checker_shape", "checker_prompt")
        cells = " | ".join(change(base, after, key) for key in keys)
        area = f"{base['checker_area']:.3f} → {after['checker_area']:.3f}"
        lines.append(f"| {name} | {base[name]:.3f} → {after[name]:.3f} | {cells} | {area} |")
    return lines


def soup_table(rows: list[dict]) -> list[str]:
    lines = [
        "| soup c (shape LoRA weight) | learned shape reward | checker shape | area reward | checker area |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['coefficient']:g} | {row['toyworld_shape']:.2f} | {row['checker_shape']:.2f} "
            f"| {row['toyworld_area']:.3f} | {row['checker_area']:.3f} |"
        )
    return lines


def markdown_tables(results: dict) -> str:
    lines = truncation_table(results) + [""] + rewards_table(results)
    if results.get("soup"):
        lines += [""] + soup_table(results["soup"])
    return "\n".join(lines) + "\n"


def truncation_study(args, rewards, splits, results, grid_prompts, grid_rows) -> dict[str, Path]:
    """The learned shape reward under each truncation strategy: before/after, curves and grid rows."""
    reward_curves, checker_curves, loras = {}, {}, {}
    for name, strategy in TRUNCATIONS.items():
        pipeline, records, loras[name] = train_lora(args, "toyworld_shape", strategy, name)
        after, _ = evaluate_splits(pipeline, rewards, splits, args)
        seconds = sum(r["seconds"] for r in records) / len(records)
        results["runs"][name] = {"after": after, "seconds_per_update": seconds, "records": records}
        print(f"{name}: {json.dumps(after)}", flush=True)
        grid_rows.append((name, generate(pipeline, grid_prompts, EVAL_SEED, **sampling(args))))
        xs = [r["update"] for r in records]
        reward_curves[name] = (xs, running_mean([r["reward_mean"] for r in records], CURVE_WINDOW))
        checker_curves[name] = (xs, running_mean([r["checker_shape_mean"] for r in records], CURVE_WINDOW))
    window = f"training batches, mean of {CURVE_WINDOW} updates"
    curves(reward_curves, args.out / "curves_reward.png", f"learned shape reward ({window})", "reward")
    curves(checker_curves, args.out / "curves_checker.png", f"checker shape accuracy ({window})", "accuracy")
    return loras


def rewards_study(args, rewards, splits, results, grid_prompts, grid_rows) -> dict[str, Path]:
    """The other rewards (per_step_uniform) and what the checker says about them; LoRAs kept for the soup."""
    results["rewards"] = {"toyworld_shape": results["runs"]["per_step_uniform"]["after"]["train"]}
    loras = {}
    for name in ("toyworld_area", "toyworld_colour"):
        pipeline, records, loras[name] = train_lora(args, name, "per_step_uniform", name)
        results["rewards"][name], _ = measure(pipeline, rewards, splits["train"] * args.eval_repeats, args)
        results["rewards_records"] = {**results.get("rewards_records", {}), name: records}
        label = f"{name.removeprefix('toyworld_')} reward"
        grid_rows.append((label, generate(pipeline, grid_prompts, EVAL_SEED, **sampling(args))))
    return loras


def setup(args) -> tuple[dict, dict]:
    """Threads and output directory as asked; the caption splits and the three rewards every study measures."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rewards = {
        "toyworld_shape": build_reward("toyworld_shape"),
        "toyworld_area": build_reward("toyworld_area", area_target=args.area_target),
        "toyworld_colour": build_reward("toyworld_colour"),
    }
    return split_captions(), rewards


def main(argv=None) -> dict:
    args = parse_args(argv)
    splits, rewards = setup(args)
    half = GRID_PROMPTS // 2
    grid_prompts = evenly_spaced(splits["train"], half) + evenly_spaced(splits["heldout"], half)

    base = models.load_pipeline(args.model)
    results = {"settings": vars(args) | {"out": str(args.out)}, "runs": {}}
    results["base"], _ = evaluate_splits(base, rewards, splits, args)
    print("base:", json.dumps(results["base"]), flush=True)
    grid_rows = [("base", generate(base, grid_prompts, EVAL_SEED, **sampling(args)))]

    loras = truncation_study(args, rewards, splits, results, grid_prompts, grid_rows)
    loras |= rewards_study(args, rewards, splits, results, grid_prompts, grid_rows)
    if not args.skip_soup:
        a, b = loras["per_step_uniform"], loras["toyworld_area"]
        results["soup"] = soup_sweep(args, a, b, rewards, splits["train"])

    titles = [grid_title(p, p in splits["heldout"]) for p in grid_prompts]
    image_grid(grid_rows, args.out / "grid.png", column_titles=titles)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown_tables(results))
    print(markdown_tables(results))
    return results


if __name__ == "__main__":
    main()
