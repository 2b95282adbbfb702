#!/usr/bin/env bash
# The evaluation issue's choices, made on VALIDATION text only (the domain's validation text, WikiText-2
# validation, held-out C4), never on test numbers; resumable (rerun to continue):
#  1. the lambda sweep: stage 2 for each regularizer form at every lambda of its grid (lambda = 0 once,
#     without a regularizer, shared by the forms) and a per-matrix mask at SPARSITY, with each mask's Jaccard
#     against lambda = 0 and the trade-off plot of every form in the folder (code/sweep.py lambda --split
#     validation, one call per form) -> LAMBDA_OUT (OUT/DOMAIN-lambda). The forms of one folder share
#     TRAIN_ARGS and so the lambda = 0 run; the
#     original code's form needs its other keys too, so it gets its own folder:
#       FORMS=upstream LAMBDA_OUT=outputs/sweeps/legal-lambda-upstream TRAIN_ARGS="casehold_examples=32
#       billsum_examples=8 importance_formula=upstream importance_accumulate=upstream loss_scale=65536
#       general_importance_norm=none general_importance_dtype=float32" bash scripts/validation_sweeps.sh legal
#  2. D-Pruner-OBS's selection (the fixed dual mask, dual importance as the OBS ranking, or the blend of
#     the two rankings at each of BLENDS) next to
#     SparseGPT, MixCal and D-Pruner, on OBS_SCORES (default: the anchor form's stage 2 at its default lambda 100)
#     -> OUT/DOMAIN-obs-selection.
#
# Usage: bash scripts/validation_sweeps.sh [legal|medical] [OUT]      (default: legal, outputs/sweeps)
# Environment: FORMS ("anchor squared_grad grad_penalty"; upstream as above), LAMBDAS (every form's grid; by
#   default 0,0.1,10,1000,100000,10000000, 8 decades since the forms differ in scale by orders of magnitude,
#   and 0,0.01,...,1000 for grad_penalty, whose every text is already 20-30 % worse at lambda = 1: RESULTS 10g),
#   SPARSITY (0.5), GENERAL_IMPORTANCE (stage 1 on 16 x 256 C4 windows, made if missing),
#   TRAIN_ARGS (the quickstart's stage-2 size; one process without DeepSpeed, which grad_penalty needs),
#   EVAL_ARGS (sweep.py evaluation sizes), OBS_SCORES (step 2's stage-2 importance folder),
#   BLENDS (0.25,0.5,0.75: dpruner-obs-blend's weights of the dual importance),
#   STEPS ("lambda obs": which of the two steps to run).
set -euo pipefail
source "$(dirname "$0")/_env.sh"
DOMAIN="${1:-legal}"
OUT="$(realpath -m "${2:-outputs/sweeps}")"
case "$DOMAIN" in
    legal) : "${TRAIN_ARGS:=casehold_examples=32 billsum_examples=8}" ;;
    medical) : "${TRAIN_ARGS:=pubmedqa_examples=24 hqs_examples=16}" ;;
    *) echo "error: first argument must be legal or medical, got '$DOMAIN'" >&2; exit 2 ;;
esac
: "${FORMS:=anchor squared_grad grad_penalty}" "${SPARSITY:=0.5}"
: "${GENERAL_IMPORTANCE:=$OUT/general_importance}" "${STEPS:=lambda obs}" "${BLENDS:=0.25,0.5,0.75}"
: "${LAMBDA_OUT:=$OUT/$DOMAIN-lambda}"
case " $STEPS " in *" lambda "*|*" obs "*) ;; *) echo "error: STEPS='$STEPS' names neither 'lambda' nor 'obs'" >&2; exit 2 ;; esac
: "${EVAL_ARGS:=--ppl-limit 100 --wiki-limit 600}"
GENERAL_IMPORTANCE="$(realpath -m "$GENERAL_IMPORTANCE")"
if ! grep -qs '"complete": true' "$GENERAL_IMPORTANCE/manifest.json"; then
    "$PY" code/general.py smollm2-135m c4 --sparsity "$SPARSITY" --nsamples 16 --seqlen 256 --out "$GENERAL_IMPORTANCE"
fi
# default_lambdas FORM: the grid where FORM moves from no effect to saturation (sections 10b-10g of RESULTS).
default_lambdas() { case "$1" in grad_penalty) echo 0,0.01,0.1,1,10,1000 ;; *) echo 0,0.1,10,1000,100000,10000000 ;; esac; }
case " $STEPS " in *" lambda "*)
    for form in $FORMS; do
        # shellcheck disable=SC2086
        "$PY" code/sweep.py lambda smollm2-135m --domain "$DOMAIN" --split validation \
            --lambdas "${LAMBDAS:-$(default_lambdas "$form")}" --forms "$form" --sparsity "$SPARSITY" \
            --general-importance "$GENERAL_IMPORTANCE" $EVAL_ARGS \
            --train-args "deepspeed=null data_max_length=256 per_device_train_batch_size=4 $TRAIN_ARGS" --out "$LAMBDA_OUT"
    done ;;
esac
case " $STEPS " in *" obs "*) ;; *) exit 0 ;; esac
OBS_SCORES="${OBS_SCORES:-$LAMBDA_OUT/lomo/anchor-lambda100.0/importance}"
# shellcheck disable=SC2086
"$PY" code/sweep.py sparsity smollm2-135m --domain "$DOMAIN" --split validation \
    --methods sparsegpt,mixcal,dpruner,dpruner-obs,dpruner-obs-saliency,dpruner-obs-blend --blends "$BLENDS" \
    --sparsities "$SPARSITY" \
    --scores "$OBS_SCORES" --nsamples 16 --seqlen 256 $EVAL_ARGS --out "$OUT/$DOMAIN-obs-selection"
