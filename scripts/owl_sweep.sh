#!/usr/bin/env bash
# The scale issue's OWL sweep: Wanda, SparseGPT and D-Pruner at 60 % and 70 % with OWL's per-block
# sparsities (--sparsity-profile owl) and with one uniform sparsity, on the legal domain; then, for each
# method and sparsity, OWL paired against uniform on the same examples (make_tables.py --reference).
# Resumable: rerun to continue.
#
# Usage: bash scripts/owl_sweep.sh [SCORES] [OUT]
#   SCORES: D-Pruner's stage-2 importance (default outputs/quickstart/lomo/importance: run the quickstart first)
#   OUT: default outputs/sweeps; writes OUT/legal-owl, OUT/legal-owl-uniform, OUT/legal-owl-paired/<method>-s<S>.md
# Environment: METHODS (wanda,sparsegpt,dpruner), SPARSITIES (0.6,0.7), EVAL_ARGS (--choice-limit 100).
set -euo pipefail
source "$(dirname "$0")/_env.sh"
SCORES="$(realpath -m "${1:-outputs/quickstart/lomo/importance}")"
OUT="$(realpath -m "${2:-outputs/sweeps}")"
: "${METHODS:=wanda,sparsegpt,dpruner}" "${SPARSITIES:=0.6,0.7}" "${EVAL_ARGS:=--choice-limit 100}"
for profile in owl uniform; do
    folder="$OUT/legal-owl"; [ "$profile" = uniform ] && folder="$OUT/legal-owl-uniform"
    # shellcheck disable=SC2086
    "$PY" code/sweep.py sparsity smollm2-135m --domain legal --methods "$METHODS" --sparsities "$SPARSITIES" \
        --scores "$SCORES" --nsamples 16 --seqlen 256 --sparsity-profile "$profile" $EVAL_ARGS --out "$folder"
done
paired="$OUT/legal-owl-paired"
mkdir -p "$paired/eval"
for method in ${METHODS//,/ }; do
    for sparsity in ${SPARSITIES//,/ }; do
        point="$method-s$sparsity"
        ln -sfn "$OUT/legal-owl-uniform/eval/$point" "$paired/eval/$point-uniform"
        ln -sfn "$OUT/legal-owl/eval/$point" "$paired/eval/$point-owl"
        "$PY" code/make_tables.py "$paired/eval" --domain legal --labels "$point-uniform,$point-owl" \
            --reference "$point-uniform" --md "$paired/$point.md" > /dev/null
        grep "^| $point-owl " "$paired/$point.md"
    done
done
echo "paired tables (OWL vs uniform, * = beyond the noise): $paired/*.md"
