"""What the written files look like from outside: LoRA bytes that depend only on the weights (not on Python's
per-process hash seed), and the permissions every other file gets (0666 / 0777 minus the umask)."""

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from alignprop import checkpoint
from alignprop.lora_files import LORA_FILE_NAME, METADATA_KEY
from alignprop.models import load_model
from alignprop.trainable import LoraAdapter

ROOT = Path(__file__).resolve().parent.parent

# A LoRA of the tiny model with seeded weights, saved into argv[1] through the code every run uses (a checkpoint
# save and the final export).
SAVE_SCRIPT = """
import sys
from pathlib import Path
import torch
from ml_collections import ConfigDict
from alignprop import checkpoint
from alignprop.models import load_model
from alignprop.trainable import LoraAdapter

model = load_model("tiny")
torch.manual_seed(0)  # after loading, which draws random numbers in an order that varies with the hash seed
lora = ConfigDict({"rank": 4, "alpha": 4.0, "target_modules": ("to_q", "to_k", "to_v", "to_out.0")})
adapter = LoraAdapter(model, lora)
out = Path(sys.argv[1])
checkpoint.save(out / "checkpoints", 1, {"update": 1}, adapter.save)
adapter.export(out)
"""


def lora_files(run: Path) -> dict[str, bytes]:
    return {str(path.relative_to(run)): path.read_bytes() for path in sorted(run.rglob(LORA_FILE_NAME))}


def test_equal_lora_weights_are_equal_bytes_whatever_the_hash_seed(tmp_path):
    saved = {}
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        out = tmp_path / seed
        subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(out)], cwd=ROOT, env=env, check=True, timeout=300)
        saved[seed] = lora_files(out)
    assert sorted(saved["1"]) == ["checkpoints/checkpoint_1/" + LORA_FILE_NAME, "lora/" + LORA_FILE_NAME]
    digests = {
        seed: {name: hashlib.sha256(data).hexdigest() for name, data in files.items()} for seed, files in saved.items()
    }
    assert digests["1"] == digests["2"] == digests["3"]
    # The header lists the targets in sorted order (a set's order is what varied between processes).
    with safe_open(str(tmp_path / "1" / "lora" / LORA_FILE_NAME), framework="pt") as handle:
        metadata = json.loads(handle.metadata()[METADATA_KEY])
    assert metadata["unet.target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]


@pytest.fixture
def umask():
    """Set the process's umask for one test, restoring it afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode) for path in sorted(root.rglob("*"))}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_checkpoints_and_final_lora_get_the_modes_of_the_umask(mask, umask, tmp_path):
    umask(mask)
    torch.manual_seed(0)
    from ml_collections import ConfigDict

    adapter = LoraAdapter(load_model("tiny"), ConfigDict({"rank": 2, "alpha": 2.0, "target_modules": ("to_q",)}))
    run = tmp_path / "run"
    run.mkdir()
    checkpoint.save(run / checkpoint.CHECKPOINTS_DIR, 1, {"update": 1}, adapter.save)
    adapter.export(run)
    found = modes(run)
    assert "lora/" + LORA_FILE_NAME in found and "checkpoints/checkpoint_1/" + checkpoint.MARKER_FILE in found
    expected = {name: (0o777 if (run / name).is_dir() else 0o666) & ~mask for name in found}
    assert found == expected
