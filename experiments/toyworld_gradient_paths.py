"""Every gradient path on the toy world at one sample budget: how well each learns the shape reward, and how
fast each hacks the colour reward. CPU, deterministic, about 10 minutes on one thread.

    .venv/bin/python -m experiments.toyworld_gradient_paths --threads 1 --out logs/toyworld/gradient_paths

Each run is the training loop on the `tiny` preset with `experiments.toyworld_alignprop`'s settings (40 updates of
16 samples, 20 DDIM steps, guidance 1, lr 1e-3, rank 4), changing only `gradient_path` (truncation runs
per_step_uniform; the other paths use their defaults, `alignprop/gradient_paths.py`). Reported, before -> after:
the learned shape reward and the checker's shape accuracy on the training and held-out captions (shape reward
runs), and the checker's background accuracy under the hackable colour reward (colour reward runs; the hack paints
the background in the shape's colour). Writes results.json and results.md.
"""

from __future__ import annotations

import json

from alignprop import models
from experiments.toyworld_alignprop import change, evaluate_splits, measure, parse_args, setup, train_lora

PATHS = ("truncation", "refl", "draft_lv", "drtune", "direct_align")


def path_table(base: dict, runs: dict) -> str:
    lines = [
        "| gradient path | s/update | learned reward (train) | checker shape (train) | checker shape (held-out) "
        "| colour reward (train) | checker background under the colour reward |",
        "|---|---|---|---|---|---|---|",
    ]
    for path, run in runs.items():
        shape, colour = run["shape"], run["colour"]
        cells = [
            f"{run['seconds_per_update']:.1f}",
            change(base["train"], shape["train"], "toyworld_shape"),
            change(base["train"], shape["train"], "checker_shape"),
            change(base["heldout"], shape["heldout"], "checker_shape"),
            change(base["train"], colour, "toyworld_colour"),
            change(base["train"], colour, "checker_background"),
        ]
        lines.append(f"| {path} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    splits, rewards = setup(args)
    base, _ = evaluate_splits(models.load_pipeline(args.model), rewards, splits, args)
    runs = {}
    for path in PATHS:
        pipeline, records, _ = train_lora(
            args, "toyworld_shape", "per_step_uniform", f"{path}-shape", gradient_path=path
        )
        shape, _ = evaluate_splits(pipeline, rewards, splits, args)
        seconds = sum(r["seconds"] for r in records) / len(records)
        pipeline, _, _ = train_lora(args, "toyworld_colour", "per_step_uniform", f"{path}-colour", gradient_path=path)
        colour, _ = measure(pipeline, rewards, splits["train"] * args.eval_repeats, args)
        runs[path] = {"shape": shape, "colour": colour, "seconds_per_update": seconds}
        print(f"{path}: {json.dumps(runs[path])}", flush=True)
    table = path_table(base, runs)
    results = {"settings": vars(args) | {"out": str(args.out)}, "base": base, "runs": runs}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
