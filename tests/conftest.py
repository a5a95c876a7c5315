"""Shared fixtures. The tiny pipeline is built once per session into a private cache directory."""

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# One cache for the whole session (subprocesses inherit it), never the user's ~/.cache.
os.environ.setdefault("ALIGNPROP_CACHE", tempfile.mkdtemp(prefix="alignprop-test-cache-"))
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
