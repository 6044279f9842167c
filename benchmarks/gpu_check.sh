#!/usr/bin/env bash
# On CUDA: the speed benchmark (a round's phases, KNN-Shapley on the device, growth with N), a repaired 50k fit
# against a plain one (the wall-time ratio), and a short end-to-end fit. About 10 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root, in the package's environment
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Writes benchmarks/results/speed_cuda.md and fit_cuda/ (the CPU results stay as they are) and the example's
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
echo "== a repaired 50k fit against a plain one, default schedule (pairs, seed 0, 10 epochs) =="
"$PYTHON" -m benchmarks.fit --protocols pairs --regimes 50k --seeds 0 --runs plain repair \
    --cache benchmarks/cache/fit_cuda --out benchmarks/results/fit_cuda
echo "== 50k fits: $((SECONDS - fit_start)) s; the time ratio is in benchmarks/results/fit_cuda/fit.md =="

example_start=$SECONDS
echo "== end-to-end: examples/fashion_mnist_repair.py --epochs 2 (accelerator='auto') =="
"$PYTHON" examples/fashion_mnist_repair.py --epochs 2
echo "== end-to-end fit: $((SECONDS - example_start)) s; gpu_check.sh total: $((SECONDS - start)) s =="
