"""The run directory: a safe name under `logdir`, the saved config, metrics.jsonl, and what a full disk says."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import unicodedata
from pathlib import Path

from alignprop.errors import UserError, excerpt

MAX_NAME_LENGTH = 80
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # EFBIG: also a file-size limit (ulimit -f)


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
        raise UserError(f"cannot create the run directory under logdir={excerpt(logdir)}: {error.strerror}") from None


def check_logdir(logdir: str) -> None:
    """Before anything loads (a refusal after the model loaded would come after its loading output): logdir exists
    as a writable directory, or its nearest existing ancestor is one (create_run_dir makes the rest)."""
    path = Path(logdir).absolute()  # as create_run_dir reads it (no ~ expansion)
    existing = next(parent for parent in (path, *path.parents) if os.path.exists(parent))  # False on any OSError
    if not existing.is_dir():
        problem = f"{excerpt(str(existing))} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{excerpt(str(existing))} is not writable"
    else:
        return
    raise UserError(f"cannot create the run directory under logdir={excerpt(logdir)}: {problem}")


def write_config(run_dir: Path, text: str) -> None:
    """run_dir/config.json; if the disk cannot take it, the run directory is removed again (nothing left)."""
    path = run_dir / "config.json"
    try:
        path.write_text(text)
    except OSError as error:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise cannot_write(error, run_dir, "start it again", target=path) from None


def os_error_behind(error: BaseException) -> OSError | None:
    """The OS error that made a write fail: Python's own, or the one safetensors' Rust writer names in its text."""
    if isinstance(error, OSError):
        return error
    match = re.search(r"\(os error (\d+)\)", str(error))
    return OSError(int(match[1]), os.strerror(int(match[1]))) if match else None


def cannot_write(error: OSError, run_dir: Path, then: str, target: Path | None = None) -> UserError:
    """One line for a write that failed: what (`target`, else the error's file, else the run), why, what to do."""
    code = errno.errorcode.get(error.errno, error.errno)
    fix = f"free space in {run_dir.parent}" if error.errno in DISK_FULL else f"make {run_dir.parent} writable"
    what = target or error.filename or run_dir
    return UserError(f"cannot write {what}: {error.strerror} [{code}]; {fix}, then {then}")


class MetricsLog:
    """Appends one JSON object per line to run_dir/metrics.jsonl (flushed, so a crash loses nothing)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
