#!/usr/bin/env bash
# The speed benchmark and a short end-to-end fit with RepairCallback, on CUDA. About 5 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root, in the package's environment
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Writes benchmarks/results/speed_cuda.md (the CPU results in speed.md stay as they are) and the example's
# logs under repair_logs/. Exits with an error, before running anything, when no GPU is visible to torch.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing to check." >&2
    exit 1
fi
"$PYTHON" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

start=$SECONDS
echo "== speed benchmark on CUDA (N = 50,000, 3 repeats) =="
"$PYTHON" -m benchmarks.speed --device cuda --n 50000 --repeats 3 --output benchmarks/results/speed_cuda.md
echo "== speed benchmark: $((SECONDS - start)) s =="

fit_start=$SECONDS
echo "== end-to-end: examples/fashion_mnist_repair.py --epochs 2 (accelerator='auto') =="
"$PYTHON" examples/fashion_mnist_repair.py --epochs 2
echo "== end-to-end fit: $((SECONDS - fit_start)) s; gpu_check.sh total: $((SECONDS - start)) s =="
