"""Written files as others see them: the permissions any file the process writes gets, and safetensors files whose
bytes depend only on their contents (so a file hash can serve as a fingerprint of the weights)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

HEADER_ALIGNMENT = 8  # safetensors pads its JSON header with spaces to a multiple of 8 bytes


def process_umask() -> int:
    """The process's umask (Linux reports it in /proc; elsewhere it is read by setting and restoring it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_normal_mode(path: Path) -> None:
    """`path` and everything below it get the mode open() and mkdir() give under the umask (files 0666 & ~umask,
    directories 0777 & ~umask): tempfile.mkdtemp and safetensors' writer make them owner-only, which teammates on a
    shared machine cannot read."""
    mask = process_umask()
    path = Path(path)
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its `__metadata__` entries in sorted order. safetensors keeps them
    in a Rust HashMap, whose order is random per process: equal tensors and metadata gave different bytes. The
    tensors' entries (their order is fixed: by alignment, then name) and the data are kept as they are."""
    path = Path(path)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    if "__metadata__" not in header:
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    if text != raw[8 : 8 + length]:
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
