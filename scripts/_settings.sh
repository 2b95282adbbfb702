# Sourced by pipeline.sh and reproduce_tables.sh: parse `DOMAIN [MODEL] [--quick|--tiny] [--out DIR] [--fresh]`,
# set every setting (environment variables of the same name win), and pin them in OUT/settings.txt so a
# rerun resumes only with the same settings. Defines `step`, `row_done LABEL` and `evaluate_model LABEL TARGET`.
# EVAL_STORE (default OUT/eval) is where finished rows live: with another folder (e.g. a tracked
# results/<domain>-standard), each row is evaluated in OUT/eval and copied there only once all its tasks
# are done, without dataset text (code/dpruner/evaluation/store.py), so a row is never a mix of two
# builds of its model; a run that resumes on another day or machine skips the rows already there and
# rebuilds only what the others need.
# DOMAIN is a shipped domain (config/domains/legal.yaml, medical.yaml) or a domain YAML path.
DOMAIN="${1:-}"
case "$DOMAIN" in
    legal|medical) DOMAIN_NAME="$DOMAIN"; shift ;;
    -h|--help) usage; exit 0 ;;
    *.yaml|*.yml) [ -f "$DOMAIN" ] || { echo "error: domain file $DOMAIN not found" >&2; exit 2; }
                  DOMAIN="$(realpath "$DOMAIN")"; DOMAIN_NAME="$(basename "${DOMAIN%.*}")"; shift ;;
    *) echo "error: first argument must be legal, medical or a domain YAML path (see --help)" >&2; exit 2 ;;
esac
MODEL=smollm2-135m; QUICK=0; TINY=0; STANDARD=0; OUT=""; FRESH=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --tiny) QUICK=1; TINY=1 ;;
        --standard) QUICK=1; STANDARD=1 ;;
        --fresh) FRESH=1 ;;
        --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }; OUT="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) MODEL="$1" ;;
    esac
    shift
done
[ -n "$OUT" ] && OUT="$(realpath -m "$OUT")"   # --out is relative to where the user runs the script
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

if [ "$TINY" = 1 ]; then
    # --quick with smaller evaluation subsets (the quickstart's): 1-2 minutes of evaluation per model,
    # sized so the quickstart stays within 15 minutes on the slower of the 2-core machines seen (RESULTS 1).
    # Stage 2 takes 8 steps of 4 examples (--quick: 10).
    : "${OUT:=outputs/$DOMAIN_NAME-tiny}" "${PPL_LIMIT:=8}" "${CHOICE_LIMIT:=15}" "${GEN_LIMIT:=2}"
    : "${GEN_ARGS:=--greedy --max-new-tokens 32}" "${WIKI_LIMIT:=100}"
    case "$DOMAIN" in
        legal) : "${TRAIN_ARGS:=casehold_examples=24 billsum_examples=8 data_max_length=256 per_device_train_batch_size=4}" ;;
        medical) : "${TRAIN_ARGS:=pubmedqa_examples=16 hqs_examples=16 data_max_length=256 per_device_train_batch_size=4}" ;;
    esac
fi
if [ "$STANDARD" = 1 ]; then
    # --quick pruning and training with evaluation sets large enough to rank methods (hours on a 2-core
    # CPU; resumable): all 200 CaseHOLD / 500 PubMedQA test rows, all 300 MultiLegalPile texts, 100 BillSum
    # bills / all 100 HQS questions with 128 new tokens, and the first 1,500 WikiText-2 test rows (213
    # windows of 512; all 4,358 rows would be 595 windows and ~40 % of a row's evaluation time).
    : "${OUT:=outputs/$DOMAIN_NAME-standard}" "${PPL_LIMIT:=300}" "${CHOICE_LIMIT:=}" "${GEN_LIMIT:=100}"
    : "${GEN_ARGS:=--greedy --max-new-tokens 128}" "${WIKI_LIMIT:=1500}" "${WIKI_SEQLEN:=512}"
fi
if [ "$QUICK" = 1 ]; then
    # Small settings that finish on a 2-core CPU; the choices are recorded in the output folder.
    : "${OUT:=outputs/$DOMAIN_NAME-quick}" "${SPARSITY:=0.5}" "${NSAMPLES:=16}" "${SEQLEN:=256}"
    # (an empty CHOICE_LIMIT / WIKI_LIMIT, as --standard sets, means the whole set)
    : "${PPL_LIMIT:=20}" "${PPL_MAX_LENGTH:=512}" "${PPL_STRIDE:=256}" "${CHOICE_LIMIT=40}" "${GEN_LIMIT:=5}"
    : "${GEN_ARGS:=--greedy --max-new-tokens 48}" "${WIKI_LIMIT=600}" "${WIKI_SEQLEN:=512}"
    case "$DOMAIN" in   # a domain YAML keeps its own counts
        legal) : "${TRAIN_ARGS:=casehold_examples=32 billsum_examples=8 data_max_length=256 per_device_train_batch_size=4}" ;;
        medical) : "${TRAIN_ARGS:=pubmedqa_examples=24 hqs_examples=16 data_max_length=256 per_device_train_batch_size=4}" ;;
        *) : "${TRAIN_ARGS:=data_max_length=256 per_device_train_batch_size=4}" ;;
    esac
else
    # The paper's settings (original code's defaults): 0.52 of the projections, 128 x 2048 C4 windows,
    # the full stage-2 config, and the full test sets with the original decoding.
    : "${OUT:=outputs/$DOMAIN_NAME}" "${SPARSITY:=0.52}" "${NSAMPLES:=128}" "${SEQLEN:=2048}"
    : "${PPL_LIMIT:=300}" "${PPL_MAX_LENGTH:=2048}" "${PPL_STRIDE:=512}" "${CHOICE_LIMIT:=}" "${GEN_LIMIT:=}"
    : "${GEN_ARGS:=}" "${WIKI_LIMIT:=}" "${WIKI_SEQLEN:=2048}" "${TRAIN_ARGS:=}"
fi
: "${WINDOWING:=document}" "${BLOCKS:=32}" "${EVAL_BATCH:=8}"
# D-Pruner-OBS's selection and blend weight (ours), chosen on validation text (docs/RESULTS.md 10e).
: "${OBS_SELECTION:=blend}" "${OBS_BLEND:=0.5}"
case "$OBS_SELECTION" in mask|saliency) OBS_SETTING="$OBS_SELECTION" ;; blend) OBS_SETTING="blend $OBS_BLEND" ;;
    *) echo "error: OBS_SELECTION='$OBS_SELECTION' must be mask, saliency or blend" >&2; exit 2 ;; esac
: "${DS_CONFIG:=config/ds_config.json}" "${LAUNCHER:=deepspeed --master_port ${MASTER_PORT:-6006}}"
CONFIG=config/args_lomo.yaml; [ "$DOMAIN" = medical ] && CONFIG=config/args_lomo_medical.yaml  # a YAML domain: domain= below
OUT="$(realpath -m "$OUT")"   # defaults are relative to the repository root (_env.sh changed into it)

SETTINGS="model=$MODEL domain=$DOMAIN sparsity=$SPARSITY nsamples=$NSAMPLES seqlen=$SEQLEN windowing=$WINDOWING
blocks=$BLOCKS train=[$TRAIN_ARGS] ppl=[$PPL_LIMIT $PPL_MAX_LENGTH $PPL_STRIDE] choice=[$CHOICE_LIMIT]
generation=[$GEN_LIMIT $GEN_ARGS] wikitext=[$WIKI_LIMIT $WIKI_SEQLEN] config=$CONFIG ds=$DS_CONFIG
obs=[$OBS_SETTING]"
[ "$FRESH" = 1 ] && rm -rf "$OUT"
mkdir -p "$OUT"
if [ -f "$OUT/settings.txt" ] && [ "$(cat "$OUT/settings.txt")" != "$SETTINGS" ]; then
    echo "error: $OUT holds results of other settings ($OUT/settings.txt); pass --fresh or another --out" >&2
    exit 2
fi
echo "$SETTINGS" > "$OUT/settings.txt"
EVAL_STORE="$(realpath -m "${EVAL_STORE:-$OUT/eval}")"
if [ "$EVAL_STORE" != "$OUT/eval" ]; then
    mkdir -p "$EVAL_STORE"
    if [ -f "$EVAL_STORE/settings.txt" ] && [ "$(cat "$EVAL_STORE/settings.txt")" != "$SETTINGS" ]; then
        echo "error: EVAL_STORE=$EVAL_STORE holds rows of other settings ($EVAL_STORE/settings.txt); set another EVAL_STORE" >&2
        exit 2
    fi
    echo "$SETTINGS" > "$EVAL_STORE/settings.txt"
fi
START=$SECONDS
step() { echo; echo "== $* (t=$((SECONDS - START)) s)"; }
opt() { [ -n "$2" ] && echo "$1 $2" || true; }   # "--limit N" only when N is set

# "TASK:RESULT:FAMILY" for every evaluation of the domain's spec that has data (MedNLI needs a user file).
TASKS="$("$PY" code/domain_evaluation.py --domain "$DOMAIN" --list-tasks | tr ' ' ':' | tr '\n' ' ')"

# run_stage2 FOLDER [key=value ...]: stage 2 (this domain's config, launcher, TRAIN_ARGS) into OUT/FOLDER
# with the stage-1 scores of OUT/general_importance, unless that run is already complete.
run_stage2() {
    local folder="$1"; shift
    if grep -qs '"complete": true' "$OUT/$folder/trainer_state.json"; then
        echo "[skip] $OUT/$folder is complete"; return
    fi
    # shellcheck disable=SC2086
    $LAUNCHER code/src/train_lomo.py "$CONFIG" domain="$DOMAIN" model_name_or_path="$MODEL" deepspeed="$DS_CONFIG" \
        general_importance_dir="$OUT/general_importance" output_dir="$OUT/$folder" $TRAIN_ARGS "$@"
}

# entry_name TASK:RESULT:FAMILY: the file name (without .json) of that evaluation's result.
entry_name() {
    local name="${1#*:}"
    if [ "${1##*:}" = general ]; then echo general_perplexity; else echo "${name%%:*}"; fi
}
# result_names: the result names of every evaluation of a row, in TASKS order (WikiText-2 last).
result_names() {
    local entry
    for entry in $TASKS general::general; do entry_name "$entry"; done
}
# row_done LABEL: true when every evaluation of LABEL is in EVAL_STORE.
row_done() {
    local name
    for name in $(result_names); do [ -f "$EVAL_STORE/$1/$name.json" ] || return 1; done
}
# evaluate_model LABEL TARGET: the domain's evaluations + WikiText-2 into OUT/eval/LABEL/<task>.json
# (finished results are kept, so a rerun resumes), then the whole row into EVAL_STORE.
evaluate_model() {
    local label="$1" target="$2" entry task name family result args script
    if row_done "$label"; then echo "[skip] $label: every evaluation is in $EVAL_STORE/$label"; return; fi
    for entry in $TASKS general::general; do
        task="${entry%%:*}"; family="${entry##*:}"; name="$(entry_name "$entry")"
        result="$OUT/eval/$label/$name.json"
        if [ -f "$result" ]; then echo "[skip] $label $name"; continue; fi
        script=(code/domain_evaluation.py --domain "$DOMAIN" --task "$task")
        case "$family" in
            general) script=(code/general_perplexity_evaluation.py)
                     args="--datasets wikitext2 --max-length $WIKI_SEQLEN $(opt --limit "$WIKI_LIMIT")" ;;
            perplexity) args="--max-length $PPL_MAX_LENGTH --stride $PPL_STRIDE $(opt --limit "$PPL_LIMIT")" ;;
            choice) args="$(opt --limit "$CHOICE_LIMIT")" ;;
            *) args="$GEN_ARGS $(opt --limit "$GEN_LIMIT")" ;;
        esac
        # shellcheck disable=SC2086
        "$PY" "${script[@]}" "$MODEL" "$target" --batch-size "$EVAL_BATCH" --out "$result" $args
    done
    [ "$EVAL_STORE" = "$OUT/eval" ] && return
    # shellcheck disable=SC2046
    "$PY" -m dpruner.evaluation.store "$OUT/eval/$label" "$EVAL_STORE" "$label" $(result_names) \
        --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
}
