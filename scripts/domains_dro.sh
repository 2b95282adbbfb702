#!/usr/bin/env bash
# Issue 12's comparison: stage 2 on several domains at once with `constant` and with `dro` mixing
# (DRPruning), each pruned by D-Pruner (stage 3), then every domain's relative perplexity on the held-out
# examples (code/domain_perplexity.py): does DRO improve the worst domain at an equal mean?
#
# Usage: bash scripts/domains_dro.sh [MODEL] [OUT]       (defaults: smollm2-135m, outputs/domains_dro)
# Environment: DOMAINS (default [legal,medical,examples/domains/python-code.yaml]),
#   SPARSITY (0.5), NSAMPLES (16), SEQLEN (256), TRAIN_ARGS (small CPU settings, see below).
set -euo pipefail
source "$(dirname "$0")/_env.sh"
MODEL="${1:-smollm2-135m}"
OUT="$(realpath -m "${2:-outputs/domains_dro}")"
: "${DOMAINS:=[legal,medical,examples/domains/python-code.yaml]}" "${SPARSITY:=0.5}" "${NSAMPLES:=16}" "${SEQLEN:=256}"
: "${TRAIN_ARGS:=casehold_examples=64 billsum_examples=16 pubmedqa_examples=64 hqs_examples=16 data_max_length=256 per_device_train_batch_size=4 domain_eval_examples=16 dro_update_interval=5}"

if ! grep -qs '"complete": true' "$OUT/general_importance/manifest.json"; then
    "$PY" code/general.py "$MODEL" c4 --sparsity "$SPARSITY" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" \
        --out "$OUT/general_importance"
fi
for mixing in constant dro; do
    if [ ! -f "$OUT/$mixing/summary.json" ]; then
        # shellcheck disable=SC2086
        "$PY" code/src/train_lomo.py config/args_lomo_domains.yaml deepspeed=null model_name_or_path="$MODEL" \
            domains="$DOMAINS" domain_mixing="$mixing" general_importance_dir="$OUT/general_importance" \
            output_dir="$OUT/$mixing" $TRAIN_ARGS
    fi
    [ -f "$OUT/$mixing/pruned/pruning_report.json" ] || \
        "$PY" code/save_model.py "$MODEL" "$OUT/$mixing/importance" "$OUT/$mixing/pruned" --sparsity "$SPARSITY"
    "$PY" code/domain_perplexity.py "$MODEL" "$OUT/$mixing/pruned" "$OUT/$mixing" --out "$OUT/$mixing/domain_perplexity.json"
done
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from dpruner.evaluation.relative_perplexity import comparison_markdown
out = Path(sys.argv[1])
runs = {m: json.loads((out / m / "domain_perplexity.json").read_text()) for m in ("constant", "dro")}
print(comparison_markdown(runs, reference="constant"))
print(f"proportions: {out}/dro/domain_proportions.csv, plot {out}/dro/domain_proportions.png")
PY
