#!/usr/bin/env bash
# Cross-dataset transfer: per seed, train on all classes of SOURCE (default imagenet), then evaluate
# that checkpoint on its targets (python -m spotlighter.run).
#
#   DATA=/path/to/datasets scripts/xd.sh TRAINER SHOTS [KEY VALUE ...]
#
# Training:   $OUTPUT/<source>/<Trainer>/<cfg>_<K>shots/seed<S>
# Evaluation: $OUTPUT/evaluation/<Trainer>/<cfg>_<K>shots/<target>/seed<S> (another SOURCE than
#             imagenet: $OUTPUT/evaluation_from_<source>/...). Zero-shot CLIP is not trained.
# DATASETS="dtd eurosat" picks targets (default: SOURCE's in spotlighter/registry.py; DATASETS= only
# trains); SOURCE=minibench for a quick check. Other environment: as scripts/base2new.sh.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${RUNNER_PYTHON:-$(command -v python || command -v python3)}" -m spotlighter.run xd "$@"
