#!/usr/bin/env bash
# Domain generalisation: evaluate the ImageNet checkpoints of scripts/xd.sh on the ImageNet variants.
#
#   DATA=/path/to/datasets scripts/dg.sh TRAINER SHOTS [KEY VALUE ...]
#
# TRAINER: spotlighter | coop | cocoop | maple | zsclip (case-insensitive)
# Reads:  $OUTPUT/<source>/<Trainer>/<cfg>_<K>shots/seed<S>   (written by scripts/xd.sh)
# Writes: $OUTPUT/evaluation/<Trainer>/<cfg>_<K>shots/<target>/seed<S>
# Extra environment (besides scripts/common.sh's DATA, SEEDS, CFG, OUTPUT, PYTHON, FORCE, DRY_RUN):
#   DATASETS="imagenet_a imagenet_r"  targets (default: imagenetv2 imagenet_sketch imagenet_a imagenet_r)
#   SOURCE=imagenet                   the dataset the checkpoints were trained on; SOURCE=minibench:
#                                     minibench_sketch minibench_noise minibench_palette by default

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage="usage: DATA=/path/to/datasets $0 TRAINER SHOTS [KEY VALUE ...]   (TRAINER: $VALID_TRAINERS)"
[ $# -ge 2 ] || die "$usage"
SHOTS="$2"
EXTRA=("${@:3}")
setup_trainer "$1"
transfer_targets "$DG_TARGETS" dg
setup_env
require_data $TARGETS
print_header "domain generalisation: $SOURCE -> $TARGETS"

transfer_paths

for SEED in $SEEDS; do
    SRC_DIR="$OUTPUT/$SRC_REL/seed$SEED"
    train_args "$SEED" "$SOURCE"
    if [ "$TRAINER" != ZeroshotCLIP ] && ! train_finished "$SRC_DIR"; then
        TRAIN_CMD="$(print_cmd "${PY[@]}" train.py "${ARGS[@]}" --output-dir "$SRC_DIR" DATASET.NUM_SHOTS "$SHOTS" "${EXTRA[@]}")"
        MSG="no finished $SOURCE checkpoint in $SRC_DIR: run scripts/xd.sh $1 $SHOTS first (with DATASETS= it only trains), or train it: $TRAIN_CMD"
        if [ "${DRY_RUN:-0}" != "1" ]; then
            echo "error: $MSG" >&2
            FAILED+=("seed$SEED: $MSG")
            continue
        fi
        say "$MSG"
    fi
    model_args "$SRC_DIR" || { FAILED+=("seed$SEED: no model.pth.tar-N checkpoint in $SRC_DIR/*/"); continue; }
    for T in $TARGETS; do
        DIR="$OUTPUT/$EVAL_REL/$T/seed$SEED"
        train_args "$SEED" "$T"
        run_job eval "$DIR" "${ARGS[@]}" --output-dir "$DIR" "${LOAD_ARGS[@]}" --eval-only "${EXTRA[@]}"
    done
done

summary() {
    local d seed accs
    for d in $TARGETS; do
        accs=()
        for seed in $SEEDS; do accs+=("$(accuracy_of "$OUTPUT/$EVAL_REL/$d/seed$seed")"); done
        printf '%-16s %8s   (per seed: %s)\n' "$d" "$(mean_of "${accs[@]}")" "${accs[*]}"
    done
}

transfer_table dg
finish
