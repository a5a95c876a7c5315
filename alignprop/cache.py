"""Where alignprop keeps what it builds or downloads once (the tiny pipeline, prompt lists)."""

import os
from pathlib import Path


def cache_root() -> Path:
    """$ALIGNPROP_CACHE, else ~/.cache/alignprop."""
    return Path(os.environ.get("ALIGNPROP_CACHE", Path.home() / ".cache" / "alignprop"))
