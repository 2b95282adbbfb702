#!/usr/bin/env bash
# First run on a fresh machine: create .venv, install the pinned packages, prepare the shipped data,
# then run the whole legal pipeline on the embedded SmolLM2-135M with settings small enough for a
# 2-core CPU (stage 1 -> stage 2 under the deepspeed launcher -> stage 3 -> evaluation of dense,
# SparseGPT and both D-Pruner models) and print the table. Output: outputs/quickstart (a rerun resumes;
# pass --fresh to start over). The evaluation subsets are smaller than `scripts/legal.sh --quick`
# (whose tables are in docs/RESULTS.md) so the whole run stays near 15 minutes.
set -euo pipefail
export TRAIN_ARGS="${TRAIN_ARGS:-casehold_examples=24 billsum_examples=8 data_max_length=256 per_device_train_batch_size=4}"
export PPL_LIMIT="${PPL_LIMIT:-10}" CHOICE_LIMIT="${CHOICE_LIMIT:-30}" GEN_LIMIT="${GEN_LIMIT:-3}"
export GEN_ARGS="${GEN_ARGS:---greedy --max-new-tokens 32}" WIKI_LIMIT="${WIKI_LIMIT:-200}"
exec bash "$(dirname "$0")/legal.sh" smollm2-135m --quick --out "$(dirname "$0")/../outputs/quickstart" "$@"
