#!/usr/bin/env bash
# Base-to-novel generalisation for one trainer and one dataset, all seeds.
#
#   DATA=/path/to/datasets scripts/base2new.sh TRAINER DATASET SHOTS [KEY VALUE ...]
#
# TRAINER: spotlighter | coop | cocoop | maple | zsclip (case-insensitive)
# DATASET: imagenet caltech101 oxford_pets stanford_cars oxford_flowers food101 fgvc_aircraft
#          sun397 dtd eurosat ucf101 minibench
# Per seed: train on the base classes into
#   $OUTPUT/base2new/train_base/<dataset>/shots_<K>/<Trainer>/<cfg>/seed<S>
# (zero-shot CLIP: an --eval-only run on the base classes), then evaluate that model on the new
# classes into $OUTPUT/base2new/test_new/...; at the end print the Base/New/HM table.
# KEY VALUE pairs are passed to every train.py call. Environment: see scripts/common.sh
# (DATA, SEEDS, CFG, OUTPUT, PYTHON, FORCE, DRY_RUN).

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage="usage: DATA=/path/to/datasets $0 TRAINER DATASET SHOTS [KEY VALUE ...]
  TRAINER: $VALID_TRAINERS   DATASET: $BASE2NEW_DATASETS minibench"
[ $# -ge 3 ] || die "$usage"
DATASET="$2"
SHOTS="$3"
EXTRA=("${@:4}")
setup_trainer "$1"
check_dataset_name "$DATASET" "$BASE2NEW_DATASETS minibench" "base-to-novel"
setup_env
require_data "$DATASET"
print_header "base2new on $DATASET"

COMMON="$DATASET/shots_$SHOTS/$TRAINER/$CFG"

for SEED in $SEEDS; do
    TRAIN_DIR="$OUTPUT/base2new/train_base/$COMMON/seed$SEED"
    TEST_DIR="$OUTPUT/base2new/test_new/$COMMON/seed$SEED"
    train_args "$SEED" "$DATASET"
    if [ "$TRAINER" = ZeroshotCLIP ]; then
        run_job eval "$TRAIN_DIR" "${ARGS[@]}" --output-dir "$TRAIN_DIR" --eval-only \
            DATASET.NUM_SHOTS "$SHOTS" DATASET.SUBSAMPLE_CLASSES base "${EXTRA[@]}"
    else
        run_job train "$TRAIN_DIR" "${ARGS[@]}" --output-dir "$TRAIN_DIR" \
            DATASET.NUM_SHOTS "$SHOTS" DATASET.SUBSAMPLE_CLASSES base "${EXTRA[@]}"
    fi
    if [ $? -ne 0 ]; then
        say "seed $SEED: training on base failed, so its evaluation on new is not run"
        continue
    fi
    if ! model_args "$TRAIN_DIR"; then
        FAILED+=("eval $TEST_DIR: no model.pth.tar-N checkpoint in $TRAIN_DIR/*/ to evaluate")
        continue
    fi
    run_job eval "$TEST_DIR" "${ARGS[@]}" --output-dir "$TEST_DIR" "${LOAD_ARGS[@]}" --eval-only \
        DATASET.NUM_SHOTS "$SHOTS" DATASET.SUBSAMPLE_CLASSES new "${EXTRA[@]}"
done

summary() {
    local seed b n bs=() ns=()
    printf '%-8s %8s %8s\n' seed Base New
    for seed in $SEEDS; do
        b="$(accuracy_of "$OUTPUT/base2new/train_base/$COMMON/seed$seed")"
        n="$(accuracy_of "$OUTPUT/base2new/test_new/$COMMON/seed$seed")"
        bs+=("$b"); ns+=("$n")
        printf '%-8s %8s %8s\n' "seed$seed" "$b" "$n"
    done
    b="$(mean_of "${bs[@]}")"; n="$(mean_of "${ns[@]}")"
    printf '%s: %s %s shots  Base %s  New %s  HM %s\n' "$DATASET" "$TRAINER" "$SHOTS" "$b" "$n" "$(hm_of "$b" "$n")"
}

results_table summary base2new --root "$OUTPUT" --trainers "$TRAINER" --configs "$CFG" --datasets "$DATASET" \
    --shots "$SHOTS" --seeds "$(echo $SEEDS | tr ' ' ',')"
finish
