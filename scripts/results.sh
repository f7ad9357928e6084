#!/usr/bin/env bash
# Seed-averaged result tables, a thin wrapper around `python -m spotlighter.results` that works
# from any directory without installing the project (relative paths stay relative to where you are):
#   scripts/results.sh {base2new,xd,dg} [--root output] [--trainers spotlighter,coop] [--configs C1,C2]
#       [--datasets D1,D2] [--shots 16] [--seeds 1,2,3] [--csv FILE] [--plot FILE_OR_DIR] [--no-published]
# PYTHON selects the interpreter (default: python).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m spotlighter.results "$@"
