#!/usr/bin/env bash
# The whole base-to-novel protocol on the built-in mini-benchmark, on a CPU, in minutes:
# generate MiniBench and pretrain its small CLIP (cached under $DATA/minibench), then run
# scripts/base2new.sh for zero-shot CLIP, CoOp and Spotlighter with seeds 1 2 3, and print the
# side-by-side Base / New / HM table.
#
#   bash scripts/demo.sh
#
# Environment: DATA (default <repo>/data), OUTPUT (default <repo>/output/demo), SEEDS (default "1 2 3"),
# PYTHON (default python), DEMO_RUNS (default "zsclip:minibench coop:minibench_ep10_ctx4
# spotlighter:minibench_ep10_paper"; add e.g. spotlighter:minibench_ep10_release,
# cocoop:minibench_ep2_batch1_ctx4, maple:minibench_ep5_batch4_2ctx_depth3). Finished runs are
# skipped on a re-run (FORCE=1 re-runs them); per-run logs are in $OUTPUT/demo-logs/.
set -euo pipefail
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# DATA and OUTPUT given relative to where the user is; the defaults live in the checkout.
export DATA="$(abspath "${DATA:-$REPO/data}")"
export OUTPUT="$(abspath "${OUTPUT:-$REPO/output/demo}")"
cd "$REPO"

PYTHON="${PYTHON:-python}"
SEEDS="${SEEDS:-1 2 3}"
DEMO_RUNS="${DEMO_RUNS:-zsclip:minibench coop:minibench_ep10_ctx4 spotlighter:minibench_ep10_paper}"
SHOTS=16

say() { printf '[demo %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# 1. What the demo needs: this project (PyPI dependencies) and upstream Dassl (from git).
if ! "$PYTHON" -c "import spotlighter, clip, yacs, tabulate" 2>/dev/null; then
    say "installing this project and its dependencies (pip install -e .)"
    "$PYTHON" -m pip install -q -e .
fi
if ! "$PYTHON" -c "import dassl.engine" 2>/dev/null; then
    if "$PYTHON" -c "import dassl" 2>/dev/null; then
        say "installing Dassl's import-time dependencies (gdown tensorboard scikit-learn wilds)"
        "$PYTHON" -m pip install -q gdown tensorboard scikit-learn wilds
    else
        cat >&2 <<'EOF'
error: upstream Dassl.pytorch is not installed (it is not on PyPI). Install it once:
    pip install gdown tensorboard scikit-learn wilds
    git clone https://github.com/KaiyangZhou/Dassl.pytorch && cd Dassl.pytorch && git checkout c61a1b5
    pip install --no-build-isolation --no-deps -e .
then run bash scripts/demo.sh again (README: Install).
EOF
        exit 2
    fi
fi

# 2. The benchmark and its CLIP (cached; a re-run is a no-op).
start=$(date +%s)
say "preparing the mini-benchmark in $DATA/minibench (first run: image generation + CLIP pretraining, a few minutes)"
"$PYTHON" -m spotlighter.benchmark prepare --root "$DATA"

# 3. base2new.sh per trainer and seed, with progress and ETA.
runs=()
for run in $DEMO_RUNS; do for seed in $SEEDS; do runs+=("$run:$seed"); done; done
total=${#runs[@]}
mkdir -p "$OUTPUT/demo-logs"
done_n=0; ran=0; spent=0; failed=0
for item in "${runs[@]}"; do
    IFS=: read -r trainer cfg seed <<<"$item"
    log="$OUTPUT/demo-logs/$trainer-$cfg-seed$seed.log"
    t0=$(date +%s)
    if [ "$ran" -gt 0 ]; then
        eta=$(( spent / ran * (total - done_n) ))
        say "[$((done_n + 1))/$total] $trainer ($cfg) seed $seed — ETA $((eta / 60))m$((eta % 60))s"
    else
        say "[1/$total] $trainer ($cfg) seed $seed"
    fi
    if ! CFG="$cfg" SEEDS="$seed" PYTHON="$PYTHON" bash scripts/base2new.sh "$trainer" minibench "$SHOTS" >"$log" 2>&1; then
        say "FAILED: $trainer ($cfg) seed $seed — see $log"
        failed=$((failed + 1))
    fi
    dt=$(( $(date +%s) - t0 ))
    done_n=$((done_n + 1))
    if grep -q "done: 0 job(s) run" "$log"; then
        say "      already finished (skipped; FORCE=1 re-runs it)"
    else
        spent=$((spent + dt)); ran=$((ran + 1))
        say "      done in ${dt}s ($(grep -h -o 'accuracy: [0-9.]*%' "$log" | tr '\n' ' '))"
    fi
done

# 4. The table.
"$PYTHON" -m spotlighter.results base2new --root "$OUTPUT" --datasets minibench --shots "$SHOTS" \
    --seeds "$(echo $SEEDS | tr ' ' ',')" --csv "$OUTPUT/minibench_base2new.csv" --no-published
elapsed=$(( $(date +%s) - start ))
say "total time $((elapsed / 60))m$((elapsed % 60))s; CSV: $OUTPUT/minibench_base2new.csv"
[ "$failed" -eq 0 ] || { say "$failed run(s) failed"; exit 1; }
