#!/usr/bin/env bash
# Seed-averaged result tables, a thin wrapper around `python -m spotlighter.results`, run from the
# repository root (so relative --root/--csv/--plot paths are relative to the repository root):
#   scripts/results.sh {base2new,xd,dg} [--root output] [--trainers spotlighter,coop] [--configs C1,C2]
#       [--datasets D1,D2] [--shots 16] [--seeds 1,2,3] [--csv FILE] [--plot FILE_OR_DIR] [--no-published]
# PYTHON selects the interpreter (default: python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" -m spotlighter.results "$@"
