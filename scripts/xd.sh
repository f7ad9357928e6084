#!/usr/bin/env bash
# Cross-dataset transfer: per seed, train on all classes of ImageNet, then evaluate that checkpoint
# on the other 10 datasets (SOURCE=minibench: MiniBench's 3 generated targets).
#
#   DATA=/path/to/datasets scripts/xd.sh TRAINER SHOTS [KEY VALUE ...]
#
# TRAINER: spotlighter | coop | cocoop | maple | zsclip (case-insensitive)
# Training:   $OUTPUT/<source>/<Trainer>/<cfg>_<K>shots/seed<S>          (source: imagenet)
# Evaluation: $OUTPUT/evaluation/<Trainer>/<cfg>_<K>shots/<target>/seed<S>
# Zero-shot CLIP is not trained: its source run is an --eval-only run on the source dataset.
# Extra environment (besides scripts/common.sh's DATA, SEEDS, CFG, OUTPUT, PYTHON, FORCE, DRY_RUN):
#   DATASETS="dtd eurosat"  target datasets (default: the 10 cross-dataset targets; DATASETS= only trains)
#   SOURCE=imagenet         the training dataset; SOURCE=minibench: MiniBench -> its 3 generated
#                           targets (minibench_glyphs minibench_textures minibench_objects), on a CPU

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage="usage: DATA=/path/to/datasets $0 TRAINER SHOTS [KEY VALUE ...]   (TRAINER: $VALID_TRAINERS)"
[ $# -ge 2 ] || die "$usage"
SHOTS="$2"
EXTRA=("${@:3}")
setup_trainer "$1"
transfer_targets "$XD_TARGETS" xd
setup_env
require_data "$SOURCE" $TARGETS
print_header "cross-dataset: $SOURCE -> $TARGETS"

transfer_paths

for SEED in $SEEDS; do
    SRC_DIR="$OUTPUT/$SRC_REL/seed$SEED"
    train_args "$SEED" "$SOURCE"
    if [ "$TRAINER" = ZeroshotCLIP ]; then
        run_job eval "$SRC_DIR" "${ARGS[@]}" --output-dir "$SRC_DIR" --eval-only DATASET.NUM_SHOTS "$SHOTS" "${EXTRA[@]}"
    else
        run_job train "$SRC_DIR" "${ARGS[@]}" --output-dir "$SRC_DIR" DATASET.NUM_SHOTS "$SHOTS" "${EXTRA[@]}"
    fi
    if [ $? -ne 0 ]; then
        say "seed $SEED: training on $SOURCE failed, so its evaluations are not run"
        continue
    fi
    if ! model_args "$SRC_DIR"; then
        FAILED+=("eval seed$SEED: no model.pth.tar-N checkpoint in $SRC_DIR/*/ to evaluate")
        continue
    fi
    for T in $TARGETS; do
        DIR="$OUTPUT/$EVAL_REL/$T/seed$SEED"
        train_args "$SEED" "$T"
        run_job eval "$DIR" "${ARGS[@]}" --output-dir "$DIR" "${LOAD_ARGS[@]}" --eval-only "${EXTRA[@]}"
    done
done

summary() {
    local d seed accs
    for d in "$SOURCE" $TARGETS; do
        accs=()
        for seed in $SEEDS; do
            if [ "$d" = "$SOURCE" ]; then accs+=("$(accuracy_of "$OUTPUT/$SRC_REL/seed$seed")")
            else accs+=("$(accuracy_of "$OUTPUT/$EVAL_REL/$d/seed$seed")"); fi
        done
        printf '%-16s %8s   (per seed: %s)\n' "$d" "$(mean_of "${accs[@]}")" "${accs[*]}"
    done
}

transfer_table xd
finish
