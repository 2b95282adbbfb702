#!/usr/bin/env bash
# Every row of the paper's table for one domain at one sparsity and one calibration budget, the table,
# a mask analysis and OUT/RESULTS_<domain>.md. Rows are built and evaluated one at a time (finished ones
# are skipped, so a rerun resumes; the rows' models are described by step):
#   1. scripts/pipeline.sh stages 1-3: sparsegpt, dpruner-matrix, dpruner-iterative (skipped when every row
#      is already in EVAL_STORE)
#   2. baselines at $SPARSITY with the same NSAMPLES x SEQLEN calibration: magnitude, wanda (C4),
#      mixcal (C4 + domain Hessians, alpha 0.5), and llm-pruner (structured) removing the fraction of ALL
#      parameters that dpruner-matrix removes (its pruning_report.json), so both keep as many parameters
#   3. ablations, each masked per matrix at $SPARSITY on the original weights (code/save_model.py):
#      dpruner-noreg  stage 2 with regularizer=none (no general-importance term), same config and launcher
#      domain-only    stage 2 with regularizer=none learning_rate=0: the importance of the domain gradients
#                     at the pretrained weights, no fine-tuning (the domain half of D-Pruner alone)
#      general-only   the stage-1 scores as the mask: SparseGPT's saliency w^2/[H^-1]_jj, per matrix,
#                     without SparseGPT's weight update (the general half of D-Pruner alone)
#   3b. the regularizer forms and D-Pruner-OBS: dpruner-upstream (the original code's formulas, raw G),
#      dpruner-squared-grad (this project's former "paper" form), dpruner-obs (OBS compensation on the
#      mixcal Hessian with the selection OBS_SELECTION, default blend: saliency^(1-b) * dual^b ranks inside
#      the sweep, b = OBS_BLEND), and its ablations dpruner-obs-mask (the dual mask, fixed) and
#      dpruner-obs-saliency (dual importance alone ranks inside the sweep)
#   4. the domain's 3 evaluations + WikiText-2 of each row, right after its model (scripts/_settings.sh:
#      EVAL_STORE keeps finished rows, STOP_AFTER_MIN stops starting rows after that many minutes);
#      OUT/table_full.md and OUT/table_full.csv of the finished rows
#      (every cell with its 95 % bootstrap interval, * = paired difference to SparseGPT beyond the noise)
#   4b. with SEEDS (e.g. SEEDS="1 2"): sparsegpt, mixcal, dpruner-matrix and dpruner-obs again with
#      calibration seed N and stage-2 seed N, as rows <label>~seedN; the table adds mean ± s.d. over seeds
#      (the default-seed row counts as one seed)
#   5. mask overlap (code/analyze_masks.py) of the unstructured models in OUT/mask_analysis, and of D-Pruner
#      and its three ablations in OUT/mask_analysis_dpruner; general-only and dpruner-matrix are exactly
#      the masks of the stage-1 and stage-2 scores at $SPARSITY, so their pair is general vs dual importance
#      (only when every model is in OUT/models: a run resumed from EVAL_STORE rebuilds only unfinished rows)
#   6. OUT/RESULTS_<domain>.md (command, date, machine, versions, settings, wall time, table, figures);
#      the Jaccard figures are copied to docs/figures/<domain>/ (<domain>-quick/, <domain>-tiny/ with those flags)
#
# Usage: scripts/reproduce_tables.sh legal|medical [MODEL] [--quick|--tiny|--standard] [--out DIR] [--fresh]
#   the arguments, settings and output folder of scripts/pipeline.sh (see its --help); every setting in
#   scripts/_settings.sh can be overridden with an environment variable of that name; ONLY_ROWS="label ..."
#   runs just those rows (e.g. ONLY_ROWS="dense wanda" or, with SEEDS="1 2", "dpruner-matrix~seed1")
set -euo pipefail
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
ARGS=("$@")
# ROWS is the table's display order. Rows are built and evaluated one at a time in EVAL_ORDER, so a run
# stopped by STOP_AFTER_MIN (minutes; no new row starts after it) has the most useful ones: the three the
# evaluation issue's target compares (SparseGPT, MixCal, D-Pruner-OBS) and then their seeds, so that the
# target rests on 3 seeds first; D-Pruner and dense, the other methods it asks for, D-Pruner's seeds, then
# the extra ablations.
ROWS="dense magnitude sparsegpt wanda llm-pruner mixcal dpruner-matrix dpruner-iterative dpruner-upstream
dpruner-squared-grad dpruner-obs dpruner-obs-mask dpruner-obs-saliency dpruner-noreg general-only domain-only"
ROWS="$(echo $ROWS)"
UNSTRUCTURED="${ROWS/dense /}"; UNSTRUCTURED="${UNSTRUCTURED/llm-pruner /}"
TARGET_SEED_ROWS="" DPRUNER_SEED_ROWS=""
for seed in ${SEEDS:-}; do
    TARGET_SEED_ROWS="$TARGET_SEED_ROWS dpruner-obs~seed$seed mixcal~seed$seed sparsegpt~seed$seed"
    DPRUNER_SEED_ROWS="$DPRUNER_SEED_ROWS dpruner-matrix~seed$seed"
done
EVAL_ORDER="sparsegpt mixcal dpruner-obs $TARGET_SEED_ROWS dpruner-matrix dense wanda magnitude dpruner-upstream
dpruner-squared-grad $DPRUNER_SEED_ROWS dpruner-iterative llm-pruner dpruner-obs-mask dpruner-obs-saliency dpruner-noreg general-only domain-only"
# ONLY_ROWS="label ...": build and evaluate just these rows (still in EVAL_ORDER's order), e.g. the rows a
# table still lacks, without starting the extra ablations after them.
if [ -n "${ONLY_ROWS:-}" ]; then
    for label in $ONLY_ROWS; do
        case " $(echo $EVAL_ORDER) " in *" $label "*) ;;
            *) echo "error: ONLY_ROWS names '$label', which is not a row here (with SEEDS='${SEEDS:-}'): $(echo $EVAL_ORDER)" >&2
               exit 2 ;;
        esac
    done
    EVAL_ORDER="$(for label in $EVAL_ORDER; do case " $(echo $ONLY_ROWS) " in *" $label "*) echo "$label" ;; esac; done)"
fi
# (after the row checks, so a misnamed row changes no folder)
source "$(dirname "$0")/_settings.sh"

CALIBRATION=(--nsamples "$NSAMPLES" --seqlen "$SEQLEN" --windowing "$WINDOWING")
# The original code's formulas (config/args_lomo_upstream.yaml's D-Pruner keys) on this run's settings.
UPSTREAM_FORM="regularizer=upstream importance_formula=upstream importance_accumulate=upstream loss_scale=65536
general_importance_norm=none general_importance_dtype=float32"
MIX=(--calibration mix --domain "$DOMAIN" --alpha 0.5)
OBS_CHOICE=(--selection "$OBS_SELECTION"); [ "$OBS_SELECTION" = blend ] && OBS_CHOICE+=(--blend "$OBS_BLEND")

# prune LABEL METHOD [OPTIONS]: code/prune_baseline.py into OUT/models/LABEL, unless it is there.
prune() {
    local label="$1" method="$2"; shift 2
    if [ -f "$OUT/models/$label/pruning_report.json" ]; then echo "[skip] $label"; return; fi
    "$PY" code/prune_baseline.py "$method" "$MODEL" "$OUT/models/$label" "$@"
}
# mask LABEL SCORES: code/save_model.py (per matrix, $SPARSITY) into OUT/models/LABEL, unless it is there.
mask() {
    if [ -f "$OUT/models/$1/pruning_report.json" ]; then echo "[skip] $1"; return; fi
    "$PY" code/save_model.py "$MODEL" "$2" "$OUT/models/$1" --sparsity "$SPARSITY"
}
# analyze FOLDER LABEL...: code/analyze_masks.py over OUT/models/LABEL, unless FOLDER is complete.
analyze() {
    local folder="$1" label sources=(); shift
    if [ -f "$folder/summary.json" ]; then echo "[skip] $folder"; return; fi
    for label in "$@"; do sources+=("$label=$OUT/models/$label"); done
    "$PY" code/analyze_masks.py "${sources[@]}" --out "$folder" --overwrite > /dev/null
}
# overall_sparsity: the fraction of ALL parameters dpruner-matrix removes (llm-pruner removes as many).
overall_sparsity() {
    "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["sparsity"]["overall_sparsity"])' \
        "$OUT/models/dpruner-matrix/pruning_report.json"
}
# seed_stage1 N / seed_stage2 N: stage 1 with calibration seed N (and SparseGPT's model of it), and
# stage 2 on it with seed N, unless they are there.
seed_stage1() {
    if grep -qs '"complete": true' "$OUT/general_importance~seed$1/manifest.json" \
        && [ -f "$OUT/models/sparsegpt~seed$1/pruning_report.json" ]; then return; fi
    "$PY" code/general.py "$MODEL" c4 --sparsity "$SPARSITY" "${CALIBRATION[@]}" --seed "$1" \
        --out "$OUT/general_importance~seed$1" --save-pruned "$OUT/models/sparsegpt~seed$1"
}
seed_stage2() {
    seed_stage1 "$1"
    # the later general_importance_dir= wins over run_stage2's own (config.load_config applies them in order)
    run_stage2 "lomo~seed$1" general_importance_dir="$OUT/general_importance~seed$1" seed="$1"
}
# build_row LABEL: what LABEL's model needs, beyond scripts/pipeline.sh's stages 1-3, unless it is there.
build_row() {
    local seed="${1##*~seed}"
    case "$1" in
        dense|sparsegpt|dpruner-matrix|dpruner-iterative) ;;   # scripts/pipeline.sh made them
        magnitude) prune magnitude magnitude --sparsity "$SPARSITY" ;;
        wanda) prune wanda wanda --sparsity "$SPARSITY" --calibration c4 "${CALIBRATION[@]}" ;;
        mixcal) prune mixcal mixcal --sparsity "$SPARSITY" "${MIX[@]}" "${CALIBRATION[@]}" ;;
        llm-pruner) prune llm-pruner llm-pruner --sparsity "$(overall_sparsity)" --calibration c4 "${CALIBRATION[@]}" ;;
        dpruner-noreg) run_stage2 lomo_noreg regularizer=none; mask dpruner-noreg "$OUT/lomo_noreg/importance" ;;
        domain-only) run_stage2 lomo_domain_only regularizer=none learning_rate=0
                     mask domain-only "$OUT/lomo_domain_only/importance" ;;
        general-only) mask general-only "$OUT/general_importance" ;;
        # shellcheck disable=SC2086
        dpruner-upstream) run_stage2 lomo_upstream $UPSTREAM_FORM; mask dpruner-upstream "$OUT/lomo_upstream/importance" ;;
        dpruner-squared-grad) run_stage2 lomo_squared_grad regularizer=squared_grad
                              mask dpruner-squared-grad "$OUT/lomo_squared_grad/importance" ;;
        dpruner-obs) prune "$1" dpruner-obs --scores "$OUT/lomo/importance" "${OBS_CHOICE[@]}" --sparsity "$SPARSITY" \
                "${MIX[@]}" "${CALIBRATION[@]}" ;;
        dpruner-obs-mask|dpruner-obs-saliency)
            prune "$1" dpruner-obs --scores "$OUT/lomo/importance" --selection "${1#dpruner-obs-}" --sparsity "$SPARSITY" \
                "${MIX[@]}" "${CALIBRATION[@]}" ;;
        sparsegpt~seed*) seed_stage1 "$seed" ;;
        mixcal~seed*) prune "$1" mixcal --sparsity "$SPARSITY" "${MIX[@]}" "${CALIBRATION[@]}" --seed "$seed" ;;
        dpruner-matrix~seed*) seed_stage2 "$seed"; mask "$1" "$OUT/lomo~seed$seed/importance" ;;
        dpruner-obs~seed*) seed_stage2 "$seed"
            prune "$1" dpruner-obs --scores "$OUT/lomo~seed$seed/importance" "${OBS_CHOICE[@]}" --sparsity "$SPARSITY" \
                "${MIX[@]}" "${CALIBRATION[@]}" --seed "$seed" ;;
        *) echo "error: no recipe for row $1" >&2; exit 2 ;;
    esac
}

step "1/6 scripts/pipeline.sh stages 1-3: SparseGPT, D-Pruner per matrix and iterative"
PIPELINE_ARGS=("$DOMAIN" "$MODEL" --out "$OUT")
if [ "$TINY" = 1 ]; then PIPELINE_ARGS+=(--tiny); elif [ "$STANDARD" = 1 ]; then PIPELINE_ARGS+=(--standard)
elif [ "$QUICK" = 1 ]; then PIPELINE_ARGS+=(--quick); fi
if [ -n "$(for label in $EVAL_ORDER; do row_done "$label" || echo "$label"; done)" ]; then
    PIPELINE_ROWS="" bash scripts/pipeline.sh "${PIPELINE_ARGS[@]}"
fi

step "2-4/6 every row, one at a time: its model (baselines at sparsity $SPARSITY, $NSAMPLES x $SEQLEN calibration tokens; ablations; regularizer forms; D-Pruner-OBS; seeds ${SEEDS:-none}), then its evaluations"
for label in $EVAL_ORDER; do
    row_done "$label" && { echo "[skip] $label: in $EVAL_STORE"; continue; }
    if [ -n "${STOP_AFTER_MIN:-}" ] && [ $((SECONDS - START)) -ge $((STOP_AFTER_MIN * 60)) ]; then
        echo "stopping: STOP_AFTER_MIN=$STOP_AFTER_MIN reached; rerun to continue with $label"; break
    fi
    build_row "$label"
    target="$OUT/models/$label"; [ "$label" = dense ] && target="$MODEL"
    evaluate_model "$label" "$target"
done
DONE_ROWS="$(for label in $ROWS; do if row_done "$label"; then echo "$label"; fi; done | tr '\n' , | sed 's/,$//')"
[ -n "$DONE_ROWS" ] || { echo "no row is finished yet; rerun to continue"; exit 0; }
"$PY" code/make_tables.py "$EVAL_STORE" --domain "$DOMAIN" --labels "$DONE_ROWS" --reference sparsegpt \
    --md "$OUT/table_full.md" --csv "$OUT/table_full.csv" > /dev/null

step "5/6 mask analysis"
FIGURES="docs/figures/$DOMAIN_NAME"
if [ "$TINY" = 1 ]; then FIGURES="$FIGURES-tiny"; elif [ "$STANDARD" = 1 ]; then FIGURES="$FIGURES-standard"
elif [ "$QUICK" = 1 ]; then FIGURES="$FIGURES-quick"; fi
MISSING_MODELS="$(for label in $UNSTRUCTURED; do [ -f "$OUT/models/$label/pruning_report.json" ] || echo "$label"; done)"
if [ -n "$MISSING_MODELS" ]; then
    # A resumed run rebuilds only the models of unfinished rows (EVAL_STORE), so the overlap waits for all.
    echo "[skip] mask analysis: no model for $(echo $MISSING_MODELS)"
else
    # shellcheck disable=SC2086
    analyze "$OUT/mask_analysis" $UNSTRUCTURED
    analyze "$OUT/mask_analysis_dpruner" dpruner-matrix dpruner-noreg general-only domain-only
    mkdir -p "$FIGURES"
    cp "$OUT/mask_analysis/jaccard_heatmap.png" "$FIGURES/jaccard_heatmap.png"
    cp "$OUT/mask_analysis_dpruner/jaccard_by_layer.png" "$FIGURES/jaccard_by_layer.png"
fi

step "6/6 $OUT/RESULTS_$DOMAIN_NAME.md"
WALL=$((SECONDS - START))
printf '%s\t%s\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$WALL" "${ARGS[*]}" >> "$OUT/reproduce_runs.tsv"
RUNS=$(wc -l < "$OUT/reproduce_runs.tsv")
TOTAL=$(awk -F'\t' '{ s += $2 } END { print s }' "$OUT/reproduce_runs.tsv")
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || echo unknown)
RAM=$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
GPU=$("$PY" -c 'import torch
print(", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none")')
VERSIONS=$("$PY" -c 'import importlib.metadata as m, platform
packages = ("torch", "transformers", "deepspeed")
print(", ".join([f"python {platform.python_version()}", *(f"{p} {m.version(p)}" for p in packages)]))')
REPORT="$OUT/RESULTS_$DOMAIN_NAME.md"
{
    echo "## $DOMAIN_NAME: all rows at sparsity $SPARSITY of the 7 projections ($MODEL)"
    echo
    echo "- command: \`bash scripts/reproduce_tables.sh ${ARGS[*]}\`"
    echo "- date: $(date -u +%Y-%m-%d) (UTC)"
    echo "- machine: $CPU, $(nproc) cores, $RAM RAM, GPU: $GPU"
    echo "- versions: $VERSIONS"
    echo "- wall time: $WALL s for this run; $TOTAL s over the $RUNS run(s) of this script on $OUT"
    echo "  (a rerun skips finished steps; each run is listed in $OUT/reproduce_runs.tsv)"
    echo "- llm-pruner removes as many of all parameters as dpruner-matrix (the Sparsity column)"
    echo "- rows in $EVAL_STORE; where each was built and evaluated: $EVAL_STORE/rows.tsv"
    echo "- settings ($OUT/settings.txt):"
    echo
    echo '```'
    cat "$OUT/settings.txt"
    echo '```'
    echo
    cat "$OUT/table_full.md"
    echo
    if [ -z "$MISSING_MODELS" ]; then
        echo "Mask overlap (Jaccard of the pruned weights):"
        echo "- [all unstructured models](mask_analysis/jaccard_heatmap.png), copy: $FIGURES/jaccard_heatmap.png"
        echo "- [D-Pruner and its ablations, per layer](mask_analysis_dpruner/jaccard_by_layer.png)," \
            "copy: $FIGURES/jaccard_by_layer.png"
        echo "- numbers: mask_analysis/jaccard.csv, mask_analysis_dpruner/jaccard.csv"
    fi
    echo
    echo "<!-- reading: -->"
} > "$REPORT.tmp"
mv "$REPORT.tmp" "$REPORT"

echo
cat "$OUT/table_full.md"
echo
echo "results: $REPORT; table $OUT/table_full.md (.csv); figures $FIGURES/"
echo "wall time: $WALL s"
