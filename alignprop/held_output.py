"""Loads that can fail are silent until they succeed or give their one line.

Loading a model or a reward prints progress bars ("Loading pipeline components"), library warnings and log lines;
when a later check of the same start-up then refuses the input, those lines stood before the one `error:` line.
`held_back_stderr` keeps everything written to stderr (Python's sys.stderr and the file descriptor itself, so
C-level writes too) while the block runs, writes it out when the block succeeds, and drops it when it raises.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

STDERR = 2


@contextlib.contextmanager
def held_back_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(STDERR)
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), STDERR)
            stream = open(held.fileno(), "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
            with stream, contextlib.redirect_stderr(stream):
                yield
            os.dup2(saved, STDERR)
            held.seek(0)
            text = held.read()
            if text:  # the block succeeded: what it wrote appears now, in order
                sys.stderr.flush()
                while text:
                    text = text[os.write(STDERR, text) :]
    finally:
        os.dup2(saved, STDERR)
        os.close(saved)
