#!/usr/bin/env bash
# Base-to-novel generalisation for one trainer and one dataset, all seeds (python -m spotlighter.run).
#
#   DATA=/path/to/datasets scripts/base2new.sh TRAINER DATASET SHOTS [KEY VALUE ...]
#
# TRAINER: spotlighter | coop | cocoop | maple | zsclip (case-insensitive); DATASET: see
# spotlighter/registry.py (the 11 published datasets and minibench). Per seed: train on the base
# classes into $OUTPUT/base2new/train_base/<dataset>/shots_<K>/<Trainer>/<cfg>/seed<S> (zero-shot
# CLIP: an --eval-only run), then evaluate that model on the new classes into .../test_new/...; at
# the end print the Base/New/HM table. KEY VALUE pairs go to every train.py call. Environment:
# DATA SEEDS CFG OUTPUT PYTHON FORCE DRY_RUN LAUNCHER JOBS GPUS SLURM_* (python -m spotlighter.run --help).
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${RUNNER_PYTHON:-$(command -v python || command -v python3)}" -m spotlighter.run base2new "$@"
