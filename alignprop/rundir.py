"""The run directory: a safe name under `logdir`, the saved config, and metrics.jsonl."""

from __future__ import annotations

import json
import re
import time
import unicodedata
from pathlib import Path

from alignprop.errors import UserError

MAX_NAME_LENGTH = 80


def slugify(text: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A file-name-safe slug: ASCII letters, digits, '-', '_' and '.', never '..', never empty."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_text).strip("._-")
    slug = re.sub(r"\.{2,}", ".", slug)[:max_length].strip("._-")
    return slug or "untitled"


def new_run_name(requested: str) -> str:
    return slugify(requested) if requested else time.strftime("%Y.%m.%d_%H.%M.%S")


def create_run_dir(logdir: str, run_name: str) -> Path:
    """Create logdir/<safe name>; a name already taken gets a numeric suffix rather than mixing runs."""
    root = Path(logdir)
    name = new_run_name(run_name)
    candidate, suffix = root / name, 1
    try:
        root.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                candidate, suffix = root / f"{name}_{suffix}", suffix + 1
    except OSError as error:
        raise UserError(f"cannot create the run directory under logdir={logdir!r}: {error.strerror}") from None


class MetricsLog:
    """Appends one JSON object per line to run_dir/metrics.jsonl (flushed, so a crash loses nothing)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
