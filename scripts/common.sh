# Shared by scripts/base2new.sh, scripts/xd.sh and scripts/dg.sh (source it; do not run it).
#
# Environment (all optional except DATA):
#   DATA      folder that holds every dataset (CoOp's $DATA layout, see DATASETS.md); required
#   SEEDS     seeds to run (default "1 2 3")
#   CFG       trainer config name under configs/trainers/<Trainer>/ (default: the trainer's own)
#   OUTPUT    output root (default "output" in the repository root)
#   PYTHON    interpreter that runs train.py (default "python"; may hold several words)
#   FORCE=1   re-run finished jobs; the old folder is moved aside to <dir>.bak-<timestamp>
#   DRY_RUN=1 print every command (copy-pasteable) instead of running it
# Exit status: 0 all jobs finished (or skipped as finished), 1 some job failed, 2 bad input.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALLER_PWD="$(pwd)"

BASE2NEW_DATASETS="imagenet caltech101 oxford_pets stanford_cars oxford_flowers food101 fgvc_aircraft sun397 dtd eurosat ucf101"
XD_TARGETS="caltech101 oxford_pets stanford_cars oxford_flowers food101 fgvc_aircraft sun397 dtd eurosat ucf101"
DG_TARGETS="imagenetv2 imagenet_sketch imagenet_a imagenet_r"
# Generated on first use (spotlighter.benchmark; folder = name): MiniBench and its xd/dg targets.
GENERATED_DATASETS="minibench minibench_glyphs minibench_textures minibench_objects minibench_sketch minibench_noise minibench_palette"
ALL_DATASETS="$BASE2NEW_DATASETS $DG_TARGETS $GENERATED_DATASETS"
VALID_TRAINERS="spotlighter coop cocoop maple zsclip"

FAILED=()
MODEL_CKPT=""  # the checkpoint the next evaluation loads (set by model_args)
NSKIP=0
NRUN=0

die() {  # bad input: say what to do, exit 2
    echo "error: $*" >&2
    exit 2
}

say() {  # progress messages; comments in DRY_RUN so the whole output stays a runnable script
    if [ "${DRY_RUN:-0}" = "1" ]; then echo "# $*"; else echo "[$(basename "$0")] $*"; fi
}

trainer_name() {  # case-insensitive trainer -> registered name
    case "$(echo "$1" | tr '[:upper:]' '[:lower:]')" in
        spotlighter) echo Spotlighter ;;
        coop) echo CoOp ;;
        cocoop) echo CoCoOp ;;
        maple) echo MaPLe ;;
        zsclip | zeroshotclip | zeroshot) echo ZeroshotCLIP ;;
        *) return 1 ;;
    esac
}

default_cfg() {
    case "$1" in
        Spotlighter) echo vit_b16_ep20_paper ;;
        CoOp) echo vit_b16_ep20_ctx4 ;;
        CoCoOp) echo vit_b16_c4_ep10_batch1_ctxv1 ;;
        MaPLe) echo vit_b16_c2_ep5_batch4_2ctx ;;
        ZeroshotCLIP) echo vit_b16 ;;
    esac
}

dataset_folder() {  # config name -> folder under $DATA (CoOp's DATASETS.md)
    case "$1" in
        imagenet) echo imagenet ;;
        caltech101) echo caltech-101 ;;
        oxford_pets) echo oxford_pets ;;
        stanford_cars) echo stanford_cars ;;
        oxford_flowers) echo oxford_flowers ;;
        food101) echo food-101 ;;
        fgvc_aircraft) echo fgvc_aircraft ;;
        sun397) echo sun397 ;;
        dtd) echo dtd ;;
        eurosat) echo eurosat ;;
        ucf101) echo ucf101 ;;
        imagenetv2) echo imagenetv2 ;;
        imagenet_sketch) echo imagenet-sketch ;;
        imagenet_a) echo imagenet-adversarial ;;
        imagenet_r) echo imagenet-rendition ;;
        minibench) echo minibench ;;
        minibench_glyphs) echo minibench_glyphs ;;
        minibench_textures) echo minibench_textures ;;
        minibench_objects) echo minibench_objects ;;
        minibench_sketch) echo minibench_sketch ;;
        minibench_noise) echo minibench_noise ;;
        minibench_palette) echo minibench_palette ;;
        *) return 1 ;;
    esac
}

dataset_section() {  # config name -> DATASETS.md section
    case "$1" in
        oxford_pets) echo oxfordpets ;;
        stanford_cars) echo stanfordcars ;;
        oxford_flowers) echo flowers102 ;;
        fgvc_aircraft) echo fgvcaircraft ;;
        imagenet_sketch) echo imagenet-sketch ;;
        imagenet_a) echo imagenet-a ;;
        imagenet_r) echo imagenet-r ;;
        *) echo "$1" ;;
    esac
}

abspath() {  # a user-given path, relative to the caller's directory
    case "$1" in
        /*) echo "$1" ;;
        *) echo "$CALLER_PWD/$1" ;;
    esac
}

# --- setup ---------------------------------------------------------------------------------
setup_trainer() {  # $1: trainer as typed -> TRAINER, CFG, CFG_FILE
    TRAINER="$(trainer_name "$1")" || die "unknown trainer '$1'. Valid trainers: $VALID_TRAINERS (case-insensitive)"
    CFG="${CFG:-$(default_cfg "$TRAINER")}"
    CFG_FILE="configs/trainers/$TRAINER/$CFG.yaml"
    if [ ! -f "$REPO/$CFG_FILE" ]; then
        local avail
        avail="$(cd "$REPO/configs/trainers/$TRAINER" 2>/dev/null && ls -- *.yaml 2>/dev/null | sed 's/\.yaml$//' | tr '\n' ' ')"
        die "trainer config $CFG_FILE does not exist. Set CFG to one of: ${avail:-(none found under configs/trainers/$TRAINER)}"
    fi
}

check_dataset_name() {  # $1 dataset, $2 the list it must be in (a description follows in $3)
    local d="$1" list="$2" x
    for x in $list; do [ "$x" = "$d" ] && return 0; done
    die "unknown dataset '$d'. Valid datasets${3:+ for $3}: $list"
}

setup_env() {  # SHOTS, SEEDS, DATA, OUTPUT, PYTHON, extra KEY VALUE args
    case "$SHOTS" in
        '' | *[!0-9]* | 0) die "SHOTS must be a positive integer (e.g. 16), got '$SHOTS'" ;;
    esac
    SEEDS="${SEEDS:-1 2 3}"
    local s
    for s in $SEEDS; do
        case "$s" in '' | *[!0-9]*) die "SEEDS must be integers separated by spaces (e.g. SEEDS=\"1 2 3\"), got '$SEEDS'" ;; esac
    done
    [ -n "$SEEDS" ] || die "SEEDS is empty"
    if [ -z "${DATA:-}" ]; then
        die "DATA is not set: export DATA=/path/to/datasets (the folder holding imagenet/, caltech-101/, ...; see DATASETS.md)"
    fi
    DATA="$(abspath "$DATA")"
    [ -d "$DATA" ] || die "DATA=$DATA does not exist or is not a folder (see DATASETS.md)"
    if [ -n "${OUTPUT:-}" ]; then OUTPUT="$(abspath "$OUTPUT")"; else OUTPUT=output; fi
    PYTHON="${PYTHON:-python}"
    read -r -a PY <<<"$PYTHON"
    if [ $((${#EXTRA[@]} % 2)) -ne 0 ]; then
        die "trailing options must be KEY VALUE pairs (e.g. OPTIM.MAX_EPOCH 5), got: ${EXTRA[*]}"
    fi
    TS="$(date +%Y%m%d-%H%M%S)"
    cd "$REPO" || die "cannot cd to $REPO"
}

require_data() {  # datasets whose folder must exist under $DATA
    local d missing=()
    for d in "$@"; do
        case " $GENERATED_DATASETS " in *" $d "*) continue ;; esac  # generated on first use
        [ -d "$DATA/$(dataset_folder "$d")" ] || missing+=("$d")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        for d in "${missing[@]}"; do
            echo "error: dataset '$d' not found: expected folder $DATA/$(dataset_folder "$d") (see DATASETS.md#$(dataset_section "$d"))" >&2
        done
        echo "       check everything with: python scripts/check_data.py --root $DATA ${missing[*]}" >&2
        exit 2
    fi
}

print_header() {
    say "$1 | trainer $TRAINER | cfg $CFG | shots $SHOTS | seeds $SEEDS"
    say "DATA=$DATA OUTPUT=$OUTPUT PYTHON=$PYTHON${EXTRA[*]:+ | extra: ${EXTRA[*]}}"
    if [ "${DRY_RUN:-0}" = "1" ]; then echo "cd $(printf '%q' "$REPO")"; fi
}

# --- cross-dataset / domain generalisation (xd.sh, dg.sh) -------------------------------------
registry_targets() {  # $1: xd | dg, $2: source -> its default targets, read from spotlighter.registry
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "${PY[@]:-python}" -c \
        "import sys; from spotlighter import registry
try: print(' '.join(getattr(registry, sys.argv[1] + '_targets')(sys.argv[2])))
except registry.RegistryError as e: sys.exit(str(e))" \
        "$1" "$2" || die "no default $1 targets for SOURCE=$2 (spotlighter.registry); set DATASETS=\"...\""
}

transfer_targets() {  # $1: default targets for SOURCE=imagenet, $2: xd | dg -> SOURCE, TARGETS (checked)
    SOURCE="${SOURCE:-imagenet}"
    check_dataset_name "$SOURCE" "$BASE2NEW_DATASETS minibench" "SOURCE"
    if [ -n "${DATASETS+set}" ]; then
        TARGETS="$DATASETS"
    elif [ "$SOURCE" = imagenet ]; then
        TARGETS="$1"
    else  # another source (e.g. minibench): its targets from the registry
        read -r -a PY <<<"${PYTHON:-python}"
        TARGETS="$(registry_targets "$2" "$SOURCE")" || exit 2
    fi
    local d
    for d in $TARGETS; do check_dataset_name "$d" "$ALL_DATASETS" "DATASETS"; done
}

transfer_paths() {  # -> SRC_REL (training on SOURCE) and EVAL_REL (its evaluations)
    SRC_REL="$SOURCE/$TRAINER/${CFG}_${SHOTS}shots"
    # Evaluations of models trained on another source than ImageNet never share ImageNet's folders.
    local root=evaluation
    [ "$SOURCE" = imagenet ] || root="evaluation_from_$SOURCE"
    EVAL_REL="$root/$TRAINER/${CFG}_${SHOTS}shots"
}

transfer_table() {  # $1: xd | dg
    results_table summary "$1" --root "$OUTPUT" --trainers "$TRAINER" --configs "$CFG" --shots "$SHOTS" \
        --seeds "$(echo $SEEDS | tr ' ' ',')" --datasets "$(echo $TARGETS | tr ' ' ',')"
}

# --- state of an output folder ---------------------------------------------------------------
train_finished() {  # a finished training run: its log says "Finish training" and result.json exists
    [ -f "$1/result.json" ] && cat "$1"/log.txt* 2>/dev/null | grep -q "Finish training"
}

eval_finished() {  # a finished evaluation: result.json exists
    [ -f "$1/result.json" ]
}

has_checkpoint() {
    ls "$1"/*/model.pth.tar-* >/dev/null 2>&1
}

last_epoch() {  # the epoch training actually wrote: <module>/checkpoint, else the highest model.pth.tar-N
    local f name n
    for f in "$1"/*/checkpoint; do
        [ -f "$f" ] || continue
        name="$(head -n 1 "$f" | tr -d '[:space:]')"
        n="${name#model.pth.tar-}"
        case "$n" in '' | *[!0-9]*) ;; *) echo "$n"; return 0 ;; esac
    done
    n="$(ls "$1"/*/model.pth.tar-* 2>/dev/null | sed 's/.*model\.pth\.tar-//' | grep -E '^[0-9]+$' | sort -n | tail -n 1)"
    [ -n "$n" ] && echo "$n"
}

config_max_epoch() {  # OPTIM.MAX_EPOCH from the trailing options, else from the trainer config
    local i
    for ((i = 0; i + 1 < ${#EXTRA[@]}; i += 2)); do
        [ "${EXTRA[i]}" = OPTIM.MAX_EPOCH ] && { echo "${EXTRA[i + 1]}"; return 0; }
    done
    awk '/^OPTIM:/{o=1; next} /^[^ #]/{o=0} o && $1=="MAX_EPOCH:"{print $2; exit}' "$REPO/$CFG_FILE"
}

newest_log() {  # the newest Dassl log of a folder (log.txt or log.txt-<timestamp>)
    ls -t "$1"/log.txt* 2>/dev/null | head -n 1
}

accuracy_of() {  # accuracy of a finished folder: result.json's "accuracy", else the last "* accuracy:" of its logs
    local acc=""
    if [ -f "$1/result.json" ]; then
        acc="$(grep -oE '"accuracy"[[:space:]]*:[[:space:]]*[0-9.eE+-]+' "$1/result.json" | tail -n 1 | sed 's/.*:[[:space:]]*//')"
    fi
    if [ -z "$acc" ]; then
        local log
        log="$(newest_log "$1")"
        [ -n "$log" ] && acc="$(grep -oE '\* accuracy: [0-9.]+' "$log" | tail -n 1 | sed 's/.*: //')"
    fi
    echo "${acc:-NA}"
}

train_args() {  # train_args SEED DATASET -> ARGS: the leading train.py options, in CoOp's order
    ARGS=(--root "$DATA" --seed "$1" --trainer "$TRAINER" --dataset-config-file "configs/datasets/$2.yaml"
          --config-file "$CFG_FILE")
}

# --- running jobs ----------------------------------------------------------------------------
print_cmd() {
    local out="" a
    for a in "$@"; do out+="$(printf '%q' "$a") "; done
    echo "${out% }"
}

# The trailing KEY VALUE options a job ran with: a finished job is only skipped when they match.
OPTIONS_FILE="run-options.txt"
same_options() {
    [ ! -f "$1/$OPTIONS_FILE" ] || [ "$(cat "$1/$OPTIONS_FILE")" = "${EXTRA[*]:-none}" ]
}

move_aside() {
    local dst="$1.bak-$TS"
    [ -e "$dst" ] && dst="$dst-$$"
    if [ "${DRY_RUN:-0}" = "1" ]; then
        print_cmd mv "$1" "$dst"
    else
        mv "$1" "$dst" && say "FORCE=1: moved the old $1 aside to $dst"
    fi
}

# run_job KIND DIR ARGS...   KIND: train (finished = "Finish training" + result.json) or eval
# (finished = result.json). Skips finished jobs, resumes interrupted ones (train.py resumes from
# its output dir), records failures in FAILED. Returns 0 when the job is finished afterwards.
run_job() {
    local kind="$1" dir="$2"
    shift 2
    local finished=eval_finished
    [ "$kind" = train ] && finished=train_finished
    if [ -e "$dir" ]; then
        if [ "${FORCE:-0}" = "1" ]; then
            move_aside "$dir"
        elif $finished "$dir" && [ "$kind" = eval ] && [ -n "$MODEL_CKPT" ] && [ "$MODEL_CKPT" -nt "$dir/result.json" ]; then
            say "stale: $MODEL_CKPT is newer than $dir/result.json (the model was retrained); re-evaluating"
            move_aside "$dir"
        elif $finished "$dir"; then
            if ! same_options "$dir"; then
                FAILED+=("$kind $dir: finished with other trailing options ($(cat "$dir/$OPTIONS_FILE")) than now (${EXTRA[*]:-none}); FORCE=1 re-runs it (the old folder is kept as .bak), or use another OUTPUT")
                MODEL_CKPT=""
                return 1
            fi
            say "skip (finished): $dir"
            NSKIP=$((NSKIP + 1))
            MODEL_CKPT=""
            return 0
        elif [ "$kind" = train ] && has_checkpoint "$dir"; then
            say "resume: $dir has checkpoints but no finished run; re-running into it resumes training"
        else
            say "re-run: $dir exists but holds no finished result"
        fi
    fi
    local cmd=("${PY[@]}" train.py "$@")
    if [ "${DRY_RUN:-0}" = "1" ]; then
        print_cmd "${cmd[@]}"
        return 0
    fi
    MODEL_CKPT=""
    mkdir -p "$dir"
    printf '%s\n' "${EXTRA[*]:-none}" >"$dir/$OPTIONS_FILE"
    local runlog="$dir/run-$TS.log"
    say "run ($kind): $dir"
    echo "$(print_cmd "${cmd[@]}")" >"$runlog"
    "${cmd[@]}" 2>&1 | tee -a "$runlog"
    local rc=${PIPESTATUS[0]}
    NRUN=$((NRUN + 1))
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$kind $dir: exit status $rc; see $runlog (Dassl log: $(newest_log "$dir" || true))")
        return 1
    fi
    if ! $finished "$dir"; then
        local want="result.json"
        [ "$kind" = train ] && want="'Finish training' in log.txt and result.json"
        FAILED+=("$kind $dir: train.py exited 0 but the folder lacks $want; see $runlog")
        return 1
    fi
    return 0
}

# model_args MODEL_DIR: --model-dir/--load-epoch of a trained folder (sets LOAD_ARGS, and
# MODEL_CKPT: the file the evaluation will load, so that run_job can tell a stale result; 1 if none).
# With TEST.FINAL_MODEL best_val training deployed model-best.pth.tar: evaluate that one too.
model_args() {
    local mdir="$1" ep best
    LOAD_ARGS=()
    MODEL_CKPT=""
    if [ "$TRAINER" = ZeroshotCLIP ]; then return 0; fi
    best="$(ls "$mdir"/*/model-best.pth.tar 2>/dev/null | head -n 1)"
    if [ -n "$best" ]; then
        LOAD_ARGS=(--model-dir "$mdir")
        MODEL_CKPT="$best"
        return 0
    fi
    ep="$(last_epoch "$mdir")"
    if [ -z "$ep" ]; then
        if [ "${DRY_RUN:-0}" = "1" ]; then
            ep="$(config_max_epoch)"
            say "$mdir has no checkpoint yet: --load-epoch ${ep:-?} assumed from OPTIM.MAX_EPOCH (a real run reads it from the checkpoint)"
            ep="${ep:-EPOCH}"
        else
            return 1
        fi
    fi
    LOAD_ARGS=(--model-dir "$mdir" --load-epoch "$ep")
    MODEL_CKPT="$(ls "$mdir"/*/"model.pth.tar-$ep" 2>/dev/null | head -n 1)"
    return 0
}

# --- end of run ------------------------------------------------------------------------------
results_table() {  # python -m spotlighter.results ARGS...; a plain summary (summary_fn) if it fails
    local summary_fn="$1"
    shift
    local cmd=("${PY[@]}" -m spotlighter.results "$@")
    if [ "${DRY_RUN:-0}" = "1" ]; then
        print_cmd "${cmd[@]}"
        return 0
    fi
    echo
    local err
    err="$(mktemp)"
    if ! "${cmd[@]}" 2>"$err"; then
        echo "(results table unavailable: '$(print_cmd "${cmd[@]}")' failed: $(tail -n 1 "$err")); plain summary:"
        $summary_fn
    fi
    rm -f "$err"
    return 0
}

mean_of() {  # numbers (NA ignored) -> mean with 2 decimals, or NA
    echo "$@" | tr ' ' '\n' | awk '$1!="NA" && $1!=""{s+=$1; n++} END{if(n) printf "%.2f", s/n; else printf "NA"}'
}

hm_of() {
    awk -v b="$1" -v n="$2" 'BEGIN{if(b=="NA"||n=="NA"||b+n==0) printf "NA"; else printf "%.2f", 2*b*n/(b+n)}'
}

finish() {  # report failures; exit status
    if [ "${DRY_RUN:-0}" = "1" ]; then exit 0; fi
    echo
    say "done: $NRUN job(s) run, $NSKIP skipped as finished, ${#FAILED[@]} failed"
    if [ ${#FAILED[@]} -gt 0 ]; then
        echo "FAILED jobs:" >&2
        local f
        for f in "${FAILED[@]}"; do echo "  $f" >&2; done
        exit 1
    fi
    exit 0
}
