#!/usr/bin/env bash
# First run on a fresh machine: create .venv, install the pinned packages, prepare the shipped data,
# then run the whole legal pipeline on the embedded SmolLM2-135M with settings small enough for a
# 2-core CPU (stage 1 -> stage 2 under the deepspeed launcher -> stage 3 -> evaluation) and print the
# table. Arguments are passed on to scripts/legal.sh (e.g. --fresh, --out DIR).
set -euo pipefail
source "$(dirname "$0")/_env.sh"
bash scripts/legal.sh smollm2-135m --quick "$@"
