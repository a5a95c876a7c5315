"""The build step that puts config/ and assets/ into a wheel (everything else is in pyproject.toml).

`pip install .` builds a wheel of the package alone; the presets and the shipped models and prompt files live
beside it in the repository, so the wheel carries copies in alignprop/package_data/, where alignprop/shipped.py
looks first. An editable install (`pip install -e .`) reads the repository's folders and copies nothing.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED_FOLDERS = ("config", "assets")


class BuildWithShippedFiles(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        for folder in SHIPPED_FOLDERS:
            target = Path(self.build_lib) / "alignprop" / "package_data" / folder
            shutil.copytree(folder, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithShippedFiles})
