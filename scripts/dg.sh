#!/usr/bin/env bash
# Domain generalisation: evaluate the SOURCE checkpoints of scripts/xd.sh on the shifted domains
# (python -m spotlighter.run).
#
#   DATA=/path/to/datasets scripts/dg.sh TRAINER SHOTS [KEY VALUE ...]
#
# Reads:  $OUTPUT/<source>/<Trainer>/<cfg>_<K>shots/seed<S>   (written by scripts/xd.sh)
# Writes: $OUTPUT/evaluation/<Trainer>/<cfg>_<K>shots/<target>/seed<S>
# DATASETS="imagenet_a imagenet_r" picks targets (default: SOURCE's in spotlighter/registry.py);
# SOURCE (default imagenet). Other environment: as scripts/base2new.sh.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${RUNNER_PYTHON:-$(command -v python || command -v python3)}" -m spotlighter.run dg "$@"
