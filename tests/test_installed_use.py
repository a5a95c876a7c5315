"""alignprop installed from a wheel (`pip install .`, not -e) and used outside the repository: the wheel carries
the presets and the shipped assets, `--config` takes a preset's name alone, and --help shows commands that run
from where it is read."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alignprop import cli

ROOT = Path(__file__).resolve().parent.parent
SOURCES = (
    "alignprop",
    "config",
    "assets",
    "pyproject.toml",
    "setup.py",
    "MANIFEST.in",
    "requirements.txt",
    "README.md",
    "LICENSE",
)


def example_commands(help_text: str) -> list[str]:
    """The command lines of --help's examples section (without their comments)."""
    lines = help_text.split("examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [line.split("#")[0].strip() for line in lines]


def files_in(folder: Path) -> list[Path]:
    return sorted(
        path.relative_to(folder) for path in folder.rglob("*") if path.is_file() and "__pycache__" not in path.parts
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package built into a wheel by its build backend, from a copy of the sources (the build writes build/
    and *.egg-info beside them), then installed with pip into a folder of its own."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    build = f"from setuptools import build_meta; build_meta.build_wheel({str(work / 'dist')!r})"
    subprocess.run([sys.executable, "-c", build], cwd=source, check=True, capture_output=True, timeout=120)
    (wheel,) = (work / "dist").glob("alignprop-*.whl")
    site = work / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)]
    subprocess.run(pip, check=True, capture_output=True, timeout=120)
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    return site, elsewhere


def run_installed(site: Path, cwd: Path, *command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_installed_command_shows_commands_that_run_where_it_is(installed):
    site, elsewhere = installed
    result = run_installed(site, elsewhere, str(site / "bin" / "alignprop"), "--help")
    assert result.returncode == 0, result.stderr
    assert "main.py" not in result.stdout and "config/align_prop.py:" not in result.stdout, result.stdout
    assert "usage: alignprop --config PRESET" in result.stdout
    assert "accelerate launch -m alignprop --config aesthetic" in result.stdout
    assert str(site / "alignprop" / "package_data" / "config" / "align_prop.py") in result.stdout  # the presets' file
    demo = example_commands(result.stdout)[0]
    assert demo == "alignprop --config tiny"
    # The demo exactly as shown, as a dry run: the shipped model, classifier and prompt files are all found.
    executable, *arguments = demo.split()
    dry = run_installed(site, elsewhere, str(site / "bin" / executable), *arguments, "--config.dry_run=True")
    assert dry.returncode == 0, dry.stderr
    assert "dry run: all 4 file(s) found" in dry.stdout, dry.stdout
    assert str(site / "alignprop" / "package_data" / "assets" / "toyworld") in dry.stdout
    assert list(elsewhere.iterdir()) == [], "a dry run writes nothing"


def test_the_wheel_is_the_package_with_its_presets_and_assets_and_nothing_else(installed):
    site, _ = installed
    shipped = site / "alignprop" / "package_data"
    for folder in ("config", "assets"):  # (loading the presets may have left a __pycache__ on either side)
        assert files_in(shipped / folder) == files_in(ROOT / folder), folder
    assert sorted(path.name for path in site.iterdir() if not path.name.endswith(".dist-info")) == ["alignprop", "bin"]


def test_a_preset_name_alone_is_the_shipped_configs_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.preset_path("tiny") == f"{cli.CONFIG_FILE}:tiny"
    assert cli.preset_path("config/align_prop.py:tiny") == "config/align_prop.py:tiny"
    (tmp_path / "mine").write_text("")  # a file of that name here is a path, as before
    assert cli.preset_path("mine") == "mine"
    argv = ["alignprop", "--config", "tiny", "--config=hps", "--config.num_epochs=1", "--", "--config", "x"]
    assert cli.with_preset_paths(argv) == [
        "alignprop",
        "--config",
        f"{cli.CONFIG_FILE}:tiny",
        f"--config={cli.CONFIG_FILE}:hps",
        "--config.num_epochs=1",
        "--",
        "--config",
        "x",
    ]


def test_in_the_repository_the_help_is_unchanged(monkeypatch):
    monkeypatch.chdir(ROOT)
    text = cli.help_text("main.py")
    assert example_commands(text)[0] == "python main.py --config config/align_prop.py:tiny"
    assert "  accelerate launch main.py --config config/align_prop.py:aesthetic" in text
    module_help = cli.help_text(str(ROOT / "alignprop" / "__main__.py"))
    assert "accelerate launch -m alignprop --config config/align_prop.py:aesthetic" in module_help
