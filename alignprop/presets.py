"""The presets of config/align_prop.py for Python callers (tests, experiments); main.py takes them by flag."""

from __future__ import annotations

import importlib.util

from ml_collections import ConfigDict

from alignprop.shipped import CONFIG_FILE


def load_preset(name: str) -> ConfigDict:
    """A fresh ConfigDict of preset `name`, exactly what `--config config/align_prop.py:NAME` gives."""
    spec = importlib.util.spec_from_file_location("align_prop_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(name)
