#!/usr/bin/env bash
# CoOp's few-shot protocol for one trainer and one dataset (python -m spotlighter.run).
#
#   DATA=/path/to/datasets scripts/fewshot.sh TRAINER DATASET [KEY VALUE ...]
#
# Per shot count K (SHOTS, default "1 2 4 8 16") and seed (SEEDS, default "1 2 3"): train on K images
# of every class (DATASET.SUBSAMPLE_CLASSES all) into $OUTPUT/fewshot/<dataset>/<Trainer>/<cfg>_<K>shots/seed<S>
# and test on all classes at the end of training. Zero-shot CLIP trains nothing: one evaluation into
# .../<cfg>_0shots/seed<first seed>. At the end print the accuracy-vs-shots table. KEY VALUE pairs go
# to every train.py call. Environment: as scripts/base2new.sh (python -m spotlighter.run --help).
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${RUNNER_PYTHON:-$(command -v python || command -v python3)}" -m spotlighter.run fewshot "$@"
