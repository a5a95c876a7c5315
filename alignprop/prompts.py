"""Prompt sets by name.

`simple_animals` / `eval_simple_animals` ship in assets/prompts/. Any other value of `prompt_fn` that is
an existing text file (one prompt per line) is read as a prompt set ("from_file").
"""

from __future__ import annotations

from pathlib import Path

from alignprop.errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "prompts"
BUILTIN = {
    "simple_animals": ASSETS / "simple_animals.txt",
    "eval_simple_animals": ASSETS / "eval_simple_animals.txt",
}


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
    if name.endswith(".txt") or "/" in name:
        return read_prompt_file(Path(name))
    raise UserError(f"unknown prompt set {name!r}; use one of {', '.join(sorted(BUILTIN))} or a path to a .txt file")
