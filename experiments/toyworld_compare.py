"""The toy world's base model against two `tiny` runs that differ only in their gradient path, compared image by
image by `python -m alignprop.compare` (README "Evaluating and comparing" shows the compare.md this writes).

    .venv/bin/python -m experiments.toyworld_compare --out logs/toyworld/compare

Three runs of `python main.py --config config/align_prop.py:tiny` with `--config.eval_seeding=per_prompt` (held-out
caption p starts from noise seeded 42 + p, FlowBP's protocol), all evaluated on the toy world's 30 held-out captions
(`toyworld_heldout`, one image each): `base` (the shipped toy model, `only_eval` with `resume_from=base`),
`truncation` (the preset as it is: AlignProp's random per-step truncation, 40 updates) and `refl` (the same with
`gradient_path=refl`: ImageReward's ReFL, one trained step among the last 10). The two training runs' last
evaluations are compared with the base's: OUT/compare.{md,csv,png}; OUT/diversity.md lists each column's
`diversity_across_prompts_mean` beside its reward. Every process runs one torch thread (deterministic numbers); a run
whose directory is already complete is kept (use a fresh --out to redo everything).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESET = ["--config", "config/align_prop.py:tiny", "--config.eval_seeding=per_prompt"]
RUNS = {  # column -> its overrides of the preset
    "base": ["--config.only_eval=True", "--config.resume_from=base"],
    "truncation": [],
    "refl": ["--config.gradient_path=refl"],
}
DONE = {"base": "summary.json", "truncation": "lora", "refl": "lora"}  # what a complete run directory holds


def single_threaded() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def make_run(out: Path, name: str) -> None:
    if (out / name / DONE[name]).exists():
        print(f"{name}: kept ({out / name})")
        return
    command = [sys.executable, "main.py", *PRESET, f"--config.logdir={out}", f"--config.run_name={name}", *RUNS[name]]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, env=single_threaded(), check=True)


def diversity_table(out: Path) -> str:
    """Each column's evaluation: its reward mean and diversity across prompts (summary.json)."""
    lines = ["| column | toyworld_shape (mean) | diversity_across_prompts_mean |", "|---|---|---|"]
    for name in RUNS:
        path = out / name / "summary.json"
        if not path.exists():  # a training run: its last evaluation
            path = sorted((out / name / "eval").glob("update_*/summary.json"))[-1]
        summary = json.loads(path.read_text())
        lines.append(f"| {name} | {summary['reward_mean']:.4g} | {summary['diversity_across_prompts_mean']:.4g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parse = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parse.add_argument("--out", type=Path, default=Path("logs/toyworld/compare"), help="where the runs and tables go")
    out = parse.parse_args().out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in RUNS:
        make_run(out, name)
    # Relative arguments, so that compare.md names the evaluations by their place under OUT.
    compare = [sys.executable, "-m", "alignprop.compare", *RUNS, "--out", "."]
    subprocess.run(compare, cwd=out, env=single_threaded(), check=True)
    (out / "diversity.md").write_text(diversity_table(out))
    print((out / "compare.md").read_text())
    print((out / "diversity.md").read_text())


if __name__ == "__main__":
    main()
