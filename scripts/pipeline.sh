#!/usr/bin/env bash
# The whole D-Pruner pipeline for one domain, then one markdown table:
#   stage 1 (general importance, + the SparseGPT-pruned model as a baseline)
#   stage 2 (LOMO fine-tuning that accumulates the dual importance, under the deepspeed launcher)
#   stage 3 (D-Pruner masks on the original weights: per matrix and with iterative blocking)
#   stage 4 (the domain's evaluations + WikiText-2 perplexity for dense, SparseGPT and both D-Pruner models)
#
# Usage: scripts/pipeline.sh legal|medical|DOMAIN.yaml [MODEL] [--quick|--tiny|--standard] [--out DIR] [--fresh]
#   DOMAIN   a shipped domain or a domain YAML path (docs/DOMAINS.md), e.g. examples/domains/python-code.yaml
#   MODEL    a Hugging Face folder, hub id, or smollm2-135m (the embedded default)
#   --quick  small settings for a 2-core CPU (minutes instead of hours); default: the paper's settings
#   --tiny   --quick with smaller evaluation subsets (the quickstart's)
#   --standard  --quick with evaluation sets large enough to rank methods (all test rows; hours on a CPU)
#   --out    output folder (default outputs/<domain>, outputs/<domain>-quick or outputs/<domain>-tiny)
#   --fresh  delete the output folder first (otherwise finished steps are skipped: the run resumes)
# Every setting in scripts/_settings.sh can be overridden with an environment variable of that name;
# PIPELINE_ROWS (default: the four models above) names the rows stage 4 evaluates, none = stages 1-3 only.
set -euo pipefail
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
source "$(dirname "$0")/_settings.sh"

step "stage 1: general importance on C4 ($NSAMPLES x $SEQLEN tokens, in-block sparsity $SPARSITY)"
if grep -qs '"complete": true' "$OUT/general_importance/manifest.json" && [ -d "$OUT/models/sparsegpt" ]; then
    echo "[skip] $OUT/general_importance is complete"
else
    "$PY" code/general.py "$MODEL" c4 --sparsity "$SPARSITY" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" \
        --windowing "$WINDOWING" --out "$OUT/general_importance" --save-pruned "$OUT/models/sparsegpt"
fi

step "stage 2: LOMO fine-tuning with the dual importance ($LAUNCHER)"
run_stage2 lomo

step "stage 3: masks on the original weights (sparsity $SPARSITY; per matrix, and $BLOCKS column blocks)"
for variant in matrix iterative; do
    if [ -f "$OUT/models/dpruner-$variant/pruning_report.json" ]; then echo "[skip] dpruner-$variant"; continue; fi
    script=code/save_model.py; extra=""
    [ "$variant" = iterative ] && script=code/save_model_iterative.py && extra="--blocks $BLOCKS"
    # shellcheck disable=SC2086
    "$PY" "$script" "$MODEL" "$OUT/lomo/importance" "$OUT/models/dpruner-$variant" --sparsity "$SPARSITY" $extra
done

PIPELINE_ROWS="${PIPELINE_ROWS-dense sparsegpt dpruner-matrix dpruner-iterative}"
[ -z "$PIPELINE_ROWS" ] && exit 0
step "stage 4: evaluation"
for label in $PIPELINE_ROWS; do
    target="$OUT/models/$label"; [ "$label" = dense ] && target="$MODEL"
    evaluate_model "$label" "$target"
done

step "table"
"$PY" code/make_tables.py "$EVAL_STORE" --domain "$DOMAIN" --labels "$(echo $PIPELINE_ROWS | tr ' ' ,)" \
    --md "$OUT/table.md" --csv "$OUT/table.csv" > /dev/null
echo "model $MODEL, $DOMAIN, sparsity $SPARSITY of the 7 projections; settings in $OUT/settings.txt"
cat "$OUT/table.md"
echo
echo "general importance (stage 1): $OUT/general_importance"
echo "dual importance (stage 2):    $OUT/lomo/importance"
echo "pruned models:                $OUT/models/{sparsegpt,dpruner-matrix,dpruner-iterative}"
echo "results:                      $EVAL_STORE/<model>/<task>.json, table $OUT/table.md"
echo "wall time: $((SECONDS - START)) s"
