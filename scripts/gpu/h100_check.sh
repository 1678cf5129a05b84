#!/bin/bash
# The GPU checks of the speed issue, prepared to fit one 15-minute lease with room for a rerun.
# Run through the device tool from the repository root, carrying the data and the wheels the GPU
# image lacks (jsonargparse and its pure-Python needs):
#   mkdir -p .gpu_data && cp ../shared/data/cifar10-jpeg.tar.gz .gpu_data/
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl jsonargparse docstring-parser typeshed-client
#   device run (carry: .gpu_data, .whl; timeout 540):  bash scripts/gpu/h100_check.sh
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 MAXDROP_CACHE=/tmp/maxdrop-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
DATA=.gpu_data/cifar10-jpeg.tar.gz
# 1. throughput of the whole pipeline (target >= 25,000 images/s), and the same without MaxDropout
timeout 150 python3 benchmarks/gpu_resnet18.py --data "$DATA" --epochs 4 | tee "$OUT/throughput.txt"
timeout 120 python3 benchmarks/gpu_resnet18.py --data "$DATA" --epochs 4 --no-maxdropout | tee -a "$OUT/throughput.txt"
# 2. the CPU comparisons of benchmarks/train.py, on the GPU in bf16
timeout 90 python3 benchmarks/train.py --device cuda --precision bf16-mixed --batch 512 --resnet-batch 512 \
  --steps 30 | tee "$OUT/train.txt"
# 3. time to 94% test accuracy through the CLI
timeout 240 python3 -m maxdrop fit --config configs/speed/resnet18_cifar10_94.yaml \
  --config configs/speed/gpu_fast.yaml --data.data_dir "$DATA" \
  --trainer.logger '{"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "/tmp/runs", "name": "t94", "version": "0"}}' \
  2>&1 | tail -20 | tee "$OUT/t94.txt"
python3 - <<'PY' | tee -a "$OUT/t94.txt"
from maxdrop.experiments.report import read_scalars
from pathlib import Path
s = read_scalars(Path("/tmp/runs/t94/0"))
acc = s.get("val/acc", [])
t0 = min(w for v in s.values() for _, _, w in v)
hit = next(((step, v, w) for step, v, w in acc if v >= 0.94), None)
print("best val/acc (= test split):", max(v for _, v, _ in acc) if acc else None)
print("time to 94%:", f"{hit[2] - t0:.1f} s (from the first logged event)" if hit else "not reached")
PY
