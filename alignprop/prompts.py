"""Prompt sets by name.

- `simple_animals` / `eval_simple_animals` ship in assets/prompts/.
- `toyworld_train` / `toyworld_heldout`: the toy world's fine-tuning captions and its held-out colour-shape
  pairs (assets/toyworld/prompts/, written by `python -m alignprop.toyworld.splits`).
- `hps_v2_all` / `eval_hps_v2_all`: the HPSv2 captions AlignProp trained and evaluated on. They are not
  shipped; they are read from assets/prompts/ if saved there, else from the cache
  ($ALIGNPROP_CACHE or ~/.cache/alignprop, under prompts/), else downloaded once from the AlignProp
  repository (a pinned commit) into that cache. Offline, download the file elsewhere and pass its path.
- `from_file:PATH`, or any value ending in .txt or containing "/": a text file, one prompt per line.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from alignprop.cache import cache_root
from alignprop.errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "prompts"
TOYWORLD_PROMPTS = ASSETS.parent / "toyworld" / "prompts"
BUILTIN = {
    "simple_animals": ASSETS / "simple_animals.txt",
    "eval_simple_animals": ASSETS / "eval_simple_animals.txt",
    "toyworld_train": TOYWORLD_PROMPTS / "train.txt",
    "toyworld_heldout": TOYWORLD_PROMPTS / "heldout.txt",
}
# The seed's own files, at the commit this project reproduces.
HPS_PROMPTS_URL = (
    "https://raw.githubusercontent.com/mihirp1998/AlignProp/185d154bc1ec25260846a2cb040841377c706d6a/assets"
)
DOWNLOADED = {
    "hps_v2_all": "hps_v2_all.txt",
    "eval_hps_v2_all": "hps_v2_all_eval.txt",
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


def prompt_cache_dir() -> Path:
    return cache_root() / "prompts"


def download_text(url: str, target: Path) -> None:
    """Fetch `url` into `target` atomically, refusing anything that is not a plain list of lines."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode("utf-8")
    if not text.strip() or text.lstrip().startswith("<"):  # empty, or an HTML error page
        raise ValueError("the download is not a prompt list")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(target)


def downloaded_prompt_file(name: str) -> Path:
    """The file of a downloadable set: saved in assets/prompts/, cached, or fetched now into the cache."""
    filename = DOWNLOADED[name]
    for candidate in (ASSETS / filename, prompt_cache_dir() / filename):
        if candidate.is_file():
            return candidate
    url = f"{HPS_PROMPTS_URL}/{filename}"
    target = prompt_cache_dir() / filename
    try:
        download_text(url, target)
    except (OSError, ValueError) as error:
        raise UserError(
            f"prompt set {name!r} is not available offline and downloading {url} failed ({error}); "
            f"download that file yourself and pass its path as prompt_fn / eval_prompt_fn "
            f"(or save it as {ASSETS / filename})"
        ) from None
    return target


def load_prompts(name: str) -> list[str]:
    """The prompt list named `name`: a built-in set, a downloadable set, or a path to a text file."""
    if name in BUILTIN:
        return read_prompt_file(BUILTIN[name])
    if name in DOWNLOADED:
        return read_prompt_file(downloaded_prompt_file(name))
    if name.startswith(FROM_FILE):
        return read_prompt_file(Path(name[len(FROM_FILE) :]).expanduser())
    if name.endswith(".txt") or "/" in name:
        return read_prompt_file(Path(name).expanduser())
    known = ", ".join(sorted({*BUILTIN, *DOWNLOADED}))
    raise UserError(
        f"unknown prompt set {name!r}; use one of {known}, from_file:PATH or a path to a .txt file"
    )
