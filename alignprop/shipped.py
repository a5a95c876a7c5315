"""Where the files that ship with alignprop lie: config/align_prop.py (the presets) and assets/ (prompt files, the
toy world's model and classifier, the aesthetic head).

In a clone and in an editable install (`pip install -e .`) they are the repository's own folders. A wheel
(`pip install .`) carries copies inside the package, in alignprop/package_data/ (setup.py's build step), so an
installed alignprop runs from any directory.
"""

import importlib.util
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
IN_PACKAGE = PACKAGE / "package_data"  # what setup.py's build step writes into a wheel
ROOT = IN_PACKAGE if IN_PACKAGE.is_dir() else PACKAGE.parent

ASSETS = ROOT / "assets"
CONFIG_FILE = ROOT / "config" / "align_prop.py"


def load_config_module(path: Path = CONFIG_FILE):
    """A config file (config/align_prop.py or the user's own) run as a module: its presets' functions."""
    spec = importlib.util.spec_from_file_location("alignprop_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
