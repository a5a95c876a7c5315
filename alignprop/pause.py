"""A test hook: hold the process at a named point so that a test can SIGKILL it exactly there.

ALIGNPROP_TEST_PAUSE="<point>:<seconds>" makes `pause_point("<point>")` sleep that long; unset (always, outside
tests/test_reliability.py) it does nothing. The points: "save" (a checkpoint's files written, not yet marked or
renamed), "rotate" (a new checkpoint in place, an older one about to be deleted), "evaluate" (mid-evaluation),
"evaluated_<name>" (eval_all_checkpoints: the evaluation of base or checkpoint_N finished, the next not begun).
"""

from __future__ import annotations

import os
import time

PAUSE_ENV = "ALIGNPROP_TEST_PAUSE"


def pause_point(name: str) -> None:
    point, _, seconds = os.environ.get(PAUSE_ENV, "").partition(":")
    if point == name:
        time.sleep(float(seconds))
