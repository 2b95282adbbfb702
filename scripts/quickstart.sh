#!/usr/bin/env bash
# First run on a fresh machine: create .venv, install the pinned packages, prepare the shipped data,
# then run the whole legal pipeline on the embedded SmolLM2-135M with settings small enough for a
# 2-core CPU (stage 1 -> stage 2 under the deepspeed launcher -> stage 3 -> evaluation of dense,
# SparseGPT and both D-Pruner models) and print the table. Output: outputs/quickstart (a rerun resumes;
# pass --fresh to start over). `--tiny` is `--quick` with smaller evaluation subsets, so the whole run
# stays near 15 minutes; `bash scripts/reproduce_tables.sh legal --tiny --out outputs/quickstart` adds
# every other row of the paper's table on top of it (docs/RESULTS.md).
set -euo pipefail
exec bash "$(dirname "$0")/legal.sh" smollm2-135m --tiny --out "$(dirname "$0")/../outputs/quickstart" "$@"
