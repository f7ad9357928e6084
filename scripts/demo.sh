#!/usr/bin/env bash
# All three protocols on the built-in mini-benchmark, on a CPU, in minutes: generate MiniBench, its
# cross-dataset and domain-generalisation targets and install the shipped small CLIP (cached under $DATA),
# then run base-to-novel, cross-dataset and DG (source minibench) for zero-shot CLIP, CoOp and
# Spotlighter with seeds 1 2 3 as one job graph, and print the three tables (python -m spotlighter.run demo).
#
#   bash scripts/demo.sh
#   DEMO_PROTOCOLS=base2new bash scripts/demo.sh      # the short run: base-to-novel only
#
# Environment: DATA (default <repo>/data), OUTPUT (default <repo>/output/demo), SEEDS, PYTHON,
# DEMO_PROTOCOLS, DEMO_RUNS ("trainer:config ..."), FORCE, JOBS, DRY_RUN, RUNNER_FORK
# (python -m spotlighter.run demo --help). Per-job logs: <job folder>/run-<time>.log.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY="${RUNNER_PYTHON:-$(command -v python || command -v python3)}"
# The runner itself needs the project's dependencies: install them before it starts (torch first).
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "error: PyTorch is not installed for $PY. Install it first (pip install torch torchvision; README:" \
         "Quick start), then run bash scripts/demo.sh again." >&2
    exit 2
fi
if ! "$PY" -c "import filelock, yacs, clip, tabulate" 2>/dev/null; then
    echo "[demo] installing this project and its dependencies ($PY -m pip install -e $REPO)"
    "$PY" -m pip install -q -e "$REPO" || { echo "error: pip install -e $REPO failed (see above)" >&2; exit 2; }
fi
exec "$PY" -m spotlighter.run demo "$@"
