#!/usr/bin/env bash
# Separate venv for the llm-compressor peer check (bench/peer_llmcompressor.py).
# Why separate: llmcompressor 0.14.0.1 pins transformers<=5.17.0 and compressed-tensors==0.19.0,
# while the project runs transformers 5.24.0. torch is pinned to the project's 2.13.0 in the same
# pip command, so pip takes the CPU wheel from this machine's disk and never swaps in a CUDA build.
# Idempotent: a stamp records the installed pins; prints the venv's python path on stdout last.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEER_VENV:-$REPO_ROOT/.cache/peer-venv}"
PYTHON_BIN="${PYTHON:-python3}"
PINS=("torch==2.13.0" "llmcompressor==0.14.0.1" "compressed-tensors==0.19.0" "transformers==5.17.0")
STAMP="$VENV/.peer-pins"
if [ "$(cat "$STAMP" 2>/dev/null)" != "${PINS[*]}" ]; then
    [ -x "$VENV/bin/python" ] || "$PYTHON_BIN" -m venv "$VENV" >&2
    echo "[peer-env] installing ${PINS[*]} into $VENV (first run: a few minutes)" >&2
    # torch alone first: with this exact version pip uses the local CPU wheel.
    "$VENV/bin/python" -m pip install -q "${PINS[0]}" >&2
    "$VENV/bin/python" -m pip install -q "${PINS[@]}" >&2
    "$VENV/bin/python" - >&2 <<'EOF'
import torch
assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None, torch.__version__
EOF
    echo "${PINS[*]}" > "$STAMP"
fi
echo "$VENV/bin/python"
