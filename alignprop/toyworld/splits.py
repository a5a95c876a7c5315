"""Which captions fine-tuning sees and which are held out: whole colour-shape pairs are held out.

The base model was trained on every caption; the held-out split asks whether what fine-tuning taught
(e.g. sharper shapes) carries over to colour-shape pairs it never fine-tuned on.
"""

from __future__ import annotations

from pathlib import Path

from alignprop.toyworld import PROMPTS_DIR
from alignprop.toyworld.captions import caption
from alignprop.toyworld.world import all_combinations

# One pair per colour, each shape twice: (shape, colour).
HELD_OUT_PAIRS = (
    ("circle", "yellow"),
    ("circle", "white"),
    ("square", "red"),
    ("square", "purple"),
    ("triangle", "green"),
    ("triangle", "blue"),
)
FILES = {"train": "train.txt", "heldout": "heldout.txt"}


def split_captions() -> dict[str, list[str]]:
    """{"train": 60 captions, "heldout": 30 captions}, in a fixed order."""
    splits = {"train": [], "heldout": []}
    for shape, colour, background in all_combinations():
        name = "heldout" if (shape, colour) in HELD_OUT_PAIRS else "train"
        splits[name].append(caption(shape, colour, background))
    return splits


def prompt_file(split: str) -> Path:
    """The shipped file of a split (one caption per line), usable as prompt_fn / eval_prompt_fn."""
    return PROMPTS_DIR / FILES[split]


def write_prompt_files(directory: Path = PROMPTS_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split, captions in split_captions().items():
        (directory / FILES[split]).write_text("\n".join(captions) + "\n")


if __name__ == "__main__":
    write_prompt_files()
