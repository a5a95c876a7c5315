# Sourced by benchmarks/gpu_*.sh: installs the wheels of .whl/ (the versions the device image lacks; see
# benchmarks/README.md for the download command) into /tmp/site, checks the imports and writes $OUT/machine.txt.
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
check='import torch, diffusers, transformers, peft, accelerate, ml_collections, open_clip
from alignprop import models, sampling
from benchmarks import bench_step
print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "accelerate", accelerate.__version__, torch.cuda.get_device_name())'

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  echo "cpus: $(nproc)"; python3 --version
} > "$OUT/machine.txt" 2>&1
install .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -c "$check" >> "$OUT/machine.txt" 2>&1 || { cat "$OUT/machine.txt"; exit 1; }
# torchao only serves the quantized (*_24gb) cases: a failed import is recorded, not fatal.
python3 -c "import torchao; print('torchao', torchao.__version__)" >> "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
