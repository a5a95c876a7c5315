"""Prompt sets by name.

- `simple_animals` / `eval_simple_animals`: the paper's aesthetic prompts (45 animals / 6 unseen ones);
- `hps_v2_all` / `eval_hps_v2_all`: the HPSv2 captions the paper trained (750) and evaluated (50) on;
  these four ship in assets/prompts/, copied from the original AlignProp repository (assets/README.md);
- `toyworld_train` / `toyworld_heldout`: the toy world's fine-tuning captions and its held-out colour-shape
  pairs (assets/toyworld/prompts/, written by `python -m alignprop.toyworld.splits`);
- `hpdv2_test`: FlowBP's 400 HPDv2 test prompts (assets/hpdv2/, copied from FlowBP; assets/hpdv2/README.md);
- `from_file:PATH`, or any value ending in .txt or containing "/": a text file, one prompt per line.

Surrounding whitespace is stripped. Blank lines are skipped (`blank_prompts="skip"`, the default), or kept as empty
prompts (`"keep"`, the paper presets): the original code read every line, so hps_v2_all.txt's 2 blank lines were 2
empty prompts among its 752 (mihirp1998/AlignProp @ 7f4503f, prompts.py, line 23).
"""

from __future__ import annotations

from pathlib import Path

from alignprop import shipped
from alignprop.errors import UserError, excerpt

ASSETS = shipped.ASSETS / "prompts"
TOYWORLD_PROMPTS = ASSETS.parent / "toyworld" / "prompts"
HPDV2_PROMPTS = ASSETS.parent / "hpdv2"
BUILTIN = {
    "simple_animals": ASSETS / "simple_animals.txt",
    "eval_simple_animals": ASSETS / "eval_simple_animals.txt",
    "hps_v2_all": ASSETS / "hps_v2_all.txt",
    "eval_hps_v2_all": ASSETS / "hps_v2_all_eval.txt",
    "toyworld_train": TOYWORLD_PROMPTS / "train.txt",
    "toyworld_heldout": TOYWORLD_PROMPTS / "heldout.txt",
    "hpdv2_test": HPDV2_PROMPTS / "eval_prompts.txt",
}
FROM_FILE = "from_file:"


def read_prompt_file(path: Path, blank_prompts: str = "skip") -> list[str]:
    """Every line stripped, as the original read them (`file.readlines()`: universal newlines); blank ones skipped
    unless `blank_prompts="keep"`."""
    if not path.is_file():
        raise UserError(f"prompt file {str(path)!r} does not exist")
    try:
        with path.open(encoding="utf-8") as file:
            lines = [line.strip() for line in file.readlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read prompt file {str(path)!r}: {error}") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise UserError(f"prompt file {str(path)!r} holds no prompts (one prompt per line)")
    return lines if blank_prompts == "keep" else prompts


def load_prompts(name: str, blank_prompts: str = "skip") -> list[str]:
    """The prompt list named `name`: a built-in set or a path to a text file (`blank_prompts`: module docstring)."""
    if name in BUILTIN:
        return read_prompt_file(BUILTIN[name], blank_prompts)
    if name.startswith(FROM_FILE):
        return read_prompt_file(Path(name[len(FROM_FILE) :]).expanduser(), blank_prompts)
    if name.endswith(".txt") or "/" in name:
        return read_prompt_file(Path(name).expanduser(), blank_prompts)
    raise UserError(
        f"unknown prompt set {excerpt(name)}; use one of {', '.join(sorted(BUILTIN))}, from_file:PATH or a path "
        "to a .txt file"
    )


def configured_prompts(config, name: str) -> list[str]:
    """`load_prompts(name)` read as the config's `blank_prompts` says."""
    return load_prompts(name, config.get("blank_prompts", "skip"))
