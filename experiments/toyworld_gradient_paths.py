"""Every gradient path on both toy models at one sample budget: how well each learns the shape reward, and how fast
each hacks the colour reward. CPU, deterministic; one thread: about 10 minutes per model for the UNet toy, more
for the flow-matching one (see README "Toy world, flow-matching edition").

    .venv/bin/python -m experiments.toyworld_gradient_paths --threads 1 --models toyworld toyworld_flow \\
        --out logs/toyworld/gradient_paths

Each run is the training loop on the model's demo preset (`tiny` for `toyworld`, `tiny_flow` for `toyworld_flow`)
with `experiments.toyworld_alignprop`'s settings (40 updates of 16 samples, the preset's sampling steps and
guidance, lr 1e-3, rank 4), changing only the gradient path: truncation as fixed K=1 (only the last step keeps its
gradient), per_step_uniform and full, and every other path (`alignprop/paths/`: refl, draft_lv, drtune,
direct_align, leapalign; the FlowBP estimators on the flow-matching model only) at its defaults. Reported, before ->
after: the learned shape reward and the
checker's shape accuracy on the training and held-out captions (shape reward runs), and the checker's background
accuracy under the hackable colour reward (colour reward runs; the hack paints the background in the shape's
colour). Each row's result is written as soon as it is measured (OUT/MODEL/rows/*.json, the base model's to
OUT/MODEL/base.json); OUT/MODEL/results.json gathers them and OUT/results.md is the joint table. OUT/MODEL/grid.png
shows 8 captions (4 training, 4 held-out) from the base model, each shape-reward LoRA and the per_step_uniform
colour-reward LoRA. `--rows` runs only some rows (e.g. two processes with half each); `--table-only` rebuilds the
table and grids from the files already there.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from alignprop import models
from alignprop.toyworld.control import generate
from alignprop.toyworld.figures import image_grid
from alignprop.toyworld.splits import split_captions
from experiments.toyworld_alignprop import (
    EVAL_SEED,
    GRID_PROMPTS,
    change,
    evaluate_splits,
    evenly_spaced,
    grid_title,
    measure,
    parse_args,
    sampling,
    setup,
    train_lora,
)

MODEL_PRESETS = {"toyworld": "tiny", "toyworld_flow": "tiny_flow"}
# row -> (gradient_path, truncation strategy)
ROWS = {
    "fixed_k1": ("truncation", "fixed"),
    "per_step_uniform": ("truncation", "per_step_uniform"),
    "full": ("truncation", "full"),
    "refl": ("refl", "per_step_uniform"),
    "draft_lv": ("draft_lv", "per_step_uniform"),
    "drtune": ("drtune", "per_step_uniform"),
    "direct_align": ("direct_align", "per_step_uniform"),
    "leapalign": ("leapalign", "per_step_uniform"),
    "flowbp_sparse": ("flowbp_sparse", "per_step_uniform"),
    "flowbp_bridge": ("flowbp_bridge", "per_step_uniform"),
    "flowbp_lagrange": ("flowbp_lagrange", "per_step_uniform"),
}
FLOW_ONLY = ("flowbp_sparse", "flowbp_bridge", "flowbp_lagrange")  # FlowBP's estimators need a flow-matching model


def path_table(results: dict[str, dict]) -> str:
    """One table over the models' results ({model: results.json contents})."""
    lines = [
        "| model | gradient path | s/update | denoiser calls with gradient per sample | learned reward (train) "
        "| checker shape (train) | checker shape (held-out) | colour reward (train) "
        "| checker background under the colour reward |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, result in results.items():
        base = result["base"]
        for label, run in result["runs"].items():
            shape, colour = run["shape"], run["colour"]
            cells = [
                f"{run['seconds_per_update']:.1f}",
                f"{run['gradient_calls']:.1f}",
                change(base["train"], shape["train"], "toyworld_shape"),
                change(base["train"], shape["train"], "checker_shape"),
                change(base["heldout"], shape["heldout"], "checker_shape"),
                change(base["train"], colour, "toyworld_colour"),
                change(base["train"], colour, "checker_background"),
            ]
            path, strategy = ROWS[label]
            name = f"truncation, {'fixed K=1' if strategy == 'fixed' else strategy}" if path == "truncation" else path
            lines.append(f"| {model} | {name} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def row_file(out: Path, label: str) -> Path:
    return out / "rows" / f"{label}.json"


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def grid_prompts(splits: dict) -> list[str]:
    half = GRID_PROMPTS // 2
    return evenly_spaced(splits["train"], half) + evenly_spaced(splits["heldout"], half)


def save_grid_row(pipeline, splits, args, path: Path) -> None:
    images = generate(pipeline, grid_prompts(splits), EVAL_SEED, **sampling(args))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(images, path)


def run_model(args, labels: list[str]) -> None:
    """The rows `labels` of ROWS on one model (args: toyworld_alignprop's, for that model's preset), each written
    to its file when done; the base model's evaluation too, unless already there."""
    splits, rewards = setup(args)
    if not (args.out / "base.json").exists():
        pipeline = models.load_pipeline(args.model)
        base, _ = evaluate_splits(pipeline, rewards, splits, args)
        write_json(args.out / "base.json", {"settings": vars(args) | {"out": str(args.out)}, "base": base})
        save_grid_row(pipeline, splits, args, args.out / "base.grid.pt")
        print(f"{args.model} base: {json.dumps(base)}", flush=True)
    for label in labels:
        if label in FLOW_ONLY and args.model == "toyworld":
            continue
        path, strategy = ROWS[label]
        name = f"{path}-{strategy}"
        pipeline, records, _ = train_lora(args, "toyworld_shape", strategy, f"{name}-shape", gradient_path=path)
        shape, _ = evaluate_splits(pipeline, rewards, splits, args)
        seconds = sum(r["seconds"] for r in records) / len(records)
        calls = sum(r["gradient_calls"] for r in records) / len(records)
        save_grid_row(pipeline, splits, args, row_file(args.out, label).with_suffix(".shape.pt"))
        pipeline, _, _ = train_lora(args, "toyworld_colour", strategy, f"{name}-colour", gradient_path=path)
        colour, _ = measure(pipeline, rewards, splits["train"] * args.eval_repeats, args)
        save_grid_row(pipeline, splits, args, row_file(args.out, label).with_suffix(".colour.pt"))
        run = {"shape": shape, "colour": colour, "seconds_per_update": seconds, "gradient_calls": calls}
        write_json(row_file(args.out, label), run)
        print(f"{args.model} {label}: {json.dumps(run)}", flush=True)


def gather(out: Path) -> dict:
    """A model's base evaluation and the rows measured so far (in ROWS order) -> OUT/MODEL/results.json."""
    results = json.loads((out / "base.json").read_text())
    rows = {label: row_file(out, label) for label in ROWS}
    results["runs"] = {label: json.loads(path.read_text()) for label, path in rows.items() if path.exists()}
    write_json(out / "results.json", results)
    grid = [("base", out / "base.grid.pt")] + [(label, rows[label].with_suffix(".shape.pt")) for label in ROWS]
    grid.append(("colour reward\n(per_step_uniform)", rows["per_step_uniform"].with_suffix(".colour.pt")))
    grid = [(label, torch.load(path, weights_only=True)) for label, path in grid if path.exists()]
    if grid:
        splits = split_captions()
        titles = [grid_title(p, p in splits["heldout"]) for p in grid_prompts(splits)]
        image_grid(grid, out / "grid.png", column_titles=titles)
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--models", nargs="+", choices=tuple(MODEL_PRESETS), default=["toyworld"])
    parser.add_argument("--rows", nargs="+", choices=tuple(ROWS), default=list(ROWS), metavar="ROW")
    parser.add_argument("--table-only", action="store_true")
    own, rest = parser.parse_known_args(argv)
    common = parse_args(rest)
    results = {}
    for model in own.models:
        args = copy.copy(common)
        args.preset, args.model, args.out = MODEL_PRESETS[model], model, common.out / model
        if not own.table_only:
            # Steps and guidance: the model's preset's (the common parse filled them from `tiny`'s unless given).
            given = parse_args([*rest, "--preset", args.preset])
            args.steps, args.guidance, args.tokens = given.steps, given.guidance, given.tokens
            run_model(args, own.rows)
        results[model] = gather(args.out)
    table = path_table(results)
    common.out.mkdir(parents=True, exist_ok=True)
    (common.out / "results.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
