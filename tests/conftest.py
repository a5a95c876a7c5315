"""Shared fixtures. The tiny pipeline is built once per session into a private cache directory."""

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# One cache for the whole session (subprocesses inherit it), never the user's ~/.cache. Under pytest-xdist the
# controller loads this file first and its workers inherit the variable, so they share the cache too: each tiny
# model is built once per run, and two workers building one at the same moment is safe (alignprop/tiny.py
# `_build_once` builds into a private staging directory and renames it into place; the loser keeps the winner's).
if "ALIGNPROP_CACHE" not in os.environ:  # (setdefault would make an unused directory in every worker)
    os.environ["ALIGNPROP_CACHE"] = tempfile.mkdtemp(prefix="alignprop-test-cache-")
# Tests never reach a model hub (there is none on CI); fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# One torch thread everywhere, subprocesses included: results must be bit-comparable between in-process runs
# and subprocess runs (the thread count changes float reduction order), and the tiny models are overhead-bound.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def preset():
    """preset(name) -> a fresh ConfigDict of that preset from config/align_prop.py."""
    from alignprop.presets import load_preset

    return load_preset


@pytest.fixture(scope="session")
def tiny_dir():
    from alignprop.tiny import tiny_pipeline_dir

    return tiny_pipeline_dir()


# Under `pytest -n 2 --dist loadfile` (the README's command) a test file is xdist's unit of work, so a module-scoped
# fixture is made once. These files also share a run that tests/checkpoint_runs.py caches per process, so each goes
# to the worker of the file named: the CPU demo (`demo_run`, about a minute) is then trained once, not twice.
SAME_WORKER_AS = {"tests/toyworld/test_finetune.py": "tests/test_train.py"}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: without xdist (plain `pytest`) it is never called
def pytest_xdist_make_scheduler(config, log):
    """xdist's --dist loadfile with the files of SAME_WORKER_AS in their partner's unit; other modes unchanged."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LoadFileWithPartners(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:  # the unit of a test: its file, here possibly its partner's
            file = super()._split_scope(nodeid)
            return SAME_WORKER_AS.get(file, file)

    return LoadFileWithPartners(config, log)
