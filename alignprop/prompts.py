"""Prompt sets by name.

- `simple_animals` / `eval_simple_animals`: the paper's aesthetic prompts (45 animals / 6 unseen ones);
- `hps_v2_all` / `eval_hps_v2_all`: the HPSv2 captions the paper trained (750) and evaluated (50) on;
  these four ship in assets/prompts/, copied from the original AlignProp repository (assets/README.md);
- `toyworld_train` / `toyworld_heldout`: the toy world's fine-tuning captions and its held-out colour-shape
  pairs (assets/toyworld/prompts/, written by `python -m alignprop.toyworld.splits`);
- `from_file:PATH`, or any value ending in .txt or containing "/": a text file, one prompt per line.

Blank lines are skipped and surrounding whitespace is stripped.
"""

from __future__ import annotations

from pathlib import Path

from alignprop.errors import UserError, excerpt

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "prompts"
TOYWORLD_PROMPTS = ASSETS.parent / "toyworld" / "prompts"
BUILTIN = {
    "simple_animals": ASSETS / "simple_animals.txt",
    "eval_simple_animals": ASSETS / "eval_simple_animals.txt",
    "hps_v2_all": ASSETS / "hps_v2_all.txt",
    "eval_hps_v2_all": ASSETS / "hps_v2_all_eval.txt",
    "toyworld_train": TOYWORLD_PROMPTS / "train.txt",
    "toyworld_heldout": TOYWORLD_PROMPTS / "heldout.txt",
}
FROM_FILE = "from_file:"


def read_prompt_file(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"prompt file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read prompt file {str(path)!r}: {error}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {str(path)!r} holds no prompts (one prompt per line)")
    return prompts


def load_prompts(name: str) -> list[str]:
    """The prompt list named `name`: a built-in set or a path to a text file."""
    if name in BUILTIN:
        return read_prompt_file(BUILTIN[name])
    if name.startswith(FROM_FILE):
        return read_prompt_file(Path(name[len(FROM_FILE) :]).expanduser())
    if name.endswith(".txt") or "/" in name:
        return read_prompt_file(Path(name).expanduser())
    raise UserError(
        f"unknown prompt set {excerpt(name)}; use one of {', '.join(sorted(BUILTIN))}, from_file:PATH or a path "
        "to a .txt file"
    )
