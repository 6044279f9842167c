#!/usr/bin/env bash
# The end-to-end benchmark (benchmarks/fit.py) on a machine with a CUDA GPU and many cores: runs side by side,
# one process and one CPU thread each, sharing the GPU. Stops starting runs after LIMIT seconds (what finished
# is cached and reported), then writes benchmarks/results/fit.md from every finished run.
#
#   bash benchmarks/gpu_fit.sh 540 --seeds 0 --jobs 12     # LIMIT, then benchmarks.fit's own arguments
#   PYTHON=/path/to/python bash benchmarks/gpu_fit.sh ...
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
LIMIT="${1:?usage: gpu_fit.sh LIMIT_SECONDS [benchmarks.fit arguments]}"
shift

if ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "gpu_fit.sh: no CUDA GPU visible to torch; nothing to run." >&2
    exit 1
fi
"$PYTHON" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
export PYTHONUNBUFFERED=1
timeout --kill-after=10 "$LIMIT" "$PYTHON" -m benchmarks.fit --threads 1 "$@"
echo "== benchmarks.fit stopped with status $? after $SECONDS s; collecting =="
"$PYTHON" -m benchmarks.fit --collect "$@"
