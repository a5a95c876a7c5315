"""The presets of config/align_prop.py for Python callers (tests, experiments); main.py takes them by flag."""

from __future__ import annotations

from ml_collections import ConfigDict

from alignprop.shipped import CONFIG_FILE, load_config_module


def load_preset(name: str) -> ConfigDict:
    """A fresh ConfigDict of preset `name`, exactly what `--config config/align_prop.py:NAME` gives."""
    return load_config_module(CONFIG_FILE).get_config(name)
