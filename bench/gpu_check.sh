#!/usr/bin/env bash
# The first-GPU-run check (<= 8 minutes on one GPU): 2:4 speed-up, stage 2 under DeepSpeed ZeRO-3 fp16
# against the CPU run, evaluator throughput, streamed stage 1 on a random 7B-shaped checkpoint; one
# table. Without a CUDA GPU it prints "no GPU" and exits 0 without running any GPU step.
#   bash bench/gpu_check.sh [--out DIR] [--plan]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH=${PYTHONPATH:-$PWD/code}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no GPU: torch sees no CUDA device; nothing run (the GPU check needs one NVIDIA GPU)"
    exit 0
fi
"$PYTHON" -c 'import torch; print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")'
exec "$PYTHON" bench/gpu_check.py "$@"
