#!/usr/bin/env bash
# All three protocols on the built-in mini-benchmark, on a CPU, in minutes: generate MiniBench, its
# cross-dataset and domain-generalisation targets and pretrain the small CLIP (cached under $DATA),
# then run scripts/base2new.sh, scripts/xd.sh and scripts/dg.sh (SOURCE=minibench) for zero-shot
# CLIP, CoOp and Spotlighter with seeds 1 2 3, and print the three tables.
#
#   bash scripts/demo.sh
#   DEMO_PROTOCOLS=base2new bash scripts/demo.sh      # the short run: base-to-novel only
#
# Environment: DATA (default <repo>/data), OUTPUT (default <repo>/output/demo), SEEDS (default "1 2 3"),
# PYTHON (default python), DEMO_PROTOCOLS (default "base2new xd dg"), DEMO_RUNS (default
# "zsclip:minibench coop:minibench_ep10_ctx4 spotlighter:minibench_ep10_paper"; add e.g.
# spotlighter:minibench_ep10_release, cocoop:minibench_ep2_batch1_ctx4,
# maple:minibench_ep5_batch4_2ctx_depth3). Finished runs are skipped on a re-run (FORCE=1 re-runs
# them); per-run logs are in $OUTPUT/demo-logs/; tables as CSV (and PNG with matplotlib) in $OUTPUT.
set -euo pipefail
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# DATA and OUTPUT given relative to where the user is; the defaults live in the checkout.
export DATA="$(abspath "${DATA:-$REPO/data}")"
export OUTPUT="$(abspath "${OUTPUT:-$REPO/output/demo}")"
cd "$REPO"

PYTHON="${PYTHON:-python}"
SEEDS="${SEEDS:-1 2 3}"
DEMO_PROTOCOLS="${DEMO_PROTOCOLS:-base2new xd dg}"
DEMO_RUNS="${DEMO_RUNS:-zsclip:minibench coop:minibench_ep10_ctx4 spotlighter:minibench_ep10_paper}"
SHOTS=16
SOURCE=minibench
# Rough prior of the relative cost of one job per trainer (CoOp = 1; from the minibench configs' epochs,
# batch sizes and per-step work). The ETA uses a (protocol, trainer) pair's measured mean once it has
# run, and this prior, scaled by what was measured so far, for pairs not timed yet.
declare -A COST=([zsclip]=0.3 [coop]=1 [spotlighter]=1.6 [cocoop]=2.5 [maple]=1.2)

say() { printf '[demo %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fmt_s() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

for p in $DEMO_PROTOCOLS; do
    case "$p" in base2new | xd | dg) ;; *) echo "error: DEMO_PROTOCOLS: unknown protocol '$p' (valid: base2new xd dg)" >&2; exit 2 ;; esac
done

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

# 2. The benchmarks and their CLIP (cached; a re-run is a no-op).
start=$(date +%s)
say "preparing MiniBench and its targets in $DATA (first run: image generation + CLIP pretraining, a few minutes)"
"$PYTHON" -m spotlighter.benchmark prepare --root "$DATA"
say "prepared in $(fmt_s $(($(date +%s) - start)))"

# 3. Every (protocol, trainer, seed) job, with progress and an ETA weighted by each trainer's cost.
jobs=()
for p in $DEMO_PROTOCOLS; do for run in $DEMO_RUNS; do for seed in $SEEDS; do jobs+=("$p:$run:$seed"); done; done; done
total=${#jobs[@]}
mkdir -p "$OUTPUT/demo-logs"
declare -A SPENT=() RAN=() PSTART=()
done_n=0; failed=0

eta() {  # seconds left for jobs[$1..]: per (protocol, trainer) mean if timed, else cost-weighted
    local i p t c per_cost_sum=0 per_cost_n=0 left=0 key
    declare -A pcost=()
    for key in "${!RAN[@]}"; do
        p="${key%%:*}"; t="${key#*:}"
        per=$(awk -v s="${SPENT[$key]}" -v n="${RAN[$key]}" -v c="${COST[$t]:-1}" 'BEGIN{print s / n / c}')
        pcost[$p]=$(awk -v a="${pcost[$p]:-0}" -v b="$per" 'BEGIN{print a + b}')
        pcost[$p.n]=$(( ${pcost[$p.n]:-0} + 1 ))
        per_cost_sum=$(awk -v a="$per_cost_sum" -v b="$per" 'BEGIN{print a + b}'); per_cost_n=$((per_cost_n + 1))
    done
    [ "$per_cost_n" -gt 0 ] || { echo ""; return; }
    for ((i = $1; i < total; i++)); do
        IFS=: read -r p t c _ <<<"${jobs[i]}"
        key="$p:$t"
        if [ -n "${RAN[$key]:-}" ]; then
            left=$(awk -v l="$left" -v s="${SPENT[$key]}" -v n="${RAN[$key]}" 'BEGIN{print l + s / n}')
        elif [ -n "${pcost[$p.n]:-}" ]; then
            left=$(awk -v l="$left" -v a="${pcost[$p]}" -v n="${pcost[$p.n]}" -v c="${COST[$t]:-1}" 'BEGIN{print l + a / n * c}')
        else
            left=$(awk -v l="$left" -v a="$per_cost_sum" -v n="$per_cost_n" -v c="${COST[$t]:-1}" 'BEGIN{print l + a / n * c}')
        fi
    done
    printf '%.0f' "$left"
}

run_protocol_job() {  # protocol trainer cfg seed log
    local p="$1" trainer="$2" cfg="$3" seed="$4" log="$5"
    case "$p" in
        base2new) CFG="$cfg" SEEDS="$seed" PYTHON="$PYTHON" bash scripts/base2new.sh "$trainer" minibench "$SHOTS" ;;
        xd) SOURCE="$SOURCE" CFG="$cfg" SEEDS="$seed" PYTHON="$PYTHON" bash scripts/xd.sh "$trainer" "$SHOTS" ;;
        dg) SOURCE="$SOURCE" CFG="$cfg" SEEDS="$seed" PYTHON="$PYTHON" bash scripts/dg.sh "$trainer" "$SHOTS" ;;
    esac >"$log" 2>&1
}

prev_p=""
for ((i = 0; i < total; i++)); do
    IFS=: read -r p trainer cfg seed <<<"${jobs[i]}"
    if [ "$p" != "$prev_p" ]; then
        [ -n "$prev_p" ] && say "== $prev_p done in $(fmt_s $(($(date +%s) - PSTART[$prev_p])))"
        PSTART[$p]=$(date +%s); prev_p="$p"
        say "== protocol $p"
    fi
    log="$OUTPUT/demo-logs/$p-$trainer-$cfg-seed$seed.log"
    e="$(eta "$i")"
    say "[$((i + 1))/$total] $p: $trainer ($cfg) seed $seed${e:+ — ETA $(fmt_s "$e")}"
    t0=$(date +%s)
    if ! run_protocol_job "$p" "$trainer" "$cfg" "$seed" "$log"; then
        say "FAILED: $p $trainer ($cfg) seed $seed — see $log"
        failed=$((failed + 1))
    fi
    dt=$(( $(date +%s) - t0 ))
    if grep -q "done: 0 job(s) run" "$log"; then
        say "      already finished (skipped; FORCE=1 re-runs it)"
    else
        SPENT[$p:$trainer]=$(( ${SPENT[$p:$trainer]:-0} + dt )); RAN[$p:$trainer]=$(( ${RAN[$p:$trainer]:-0} + 1 ))
        say "      done in ${dt}s ($(grep -h -o 'accuracy: [0-9.]*%' "$log" | tr '\n' ' '))"
    fi
done
[ -n "$prev_p" ] && say "== $prev_p done in $(fmt_s $(($(date +%s) - PSTART[$prev_p])))"

# 4. The tables (CSV always; PNG when matplotlib is installed).
seeds_csv="$(echo $SEEDS | tr ' ' ',')"
# only this demo's trainers and configs (OUTPUT may hold other runs)
trainers_csv="$(for r in $DEMO_RUNS; do echo "${r%%:*}"; done | sort -u | tr '\n' ',' | sed 's/,$//')"
configs_csv="$(for r in $DEMO_RUNS; do echo "${r#*:}"; done | sort -u | tr '\n' ',' | sed 's/,$//')"
plot=()
for p in $DEMO_PROTOCOLS; do
    "$PYTHON" -c "import matplotlib" 2>/dev/null && plot=(--plot "$OUTPUT/minibench_$p.png" --plot-deltas) || plot=()
    echo
    case "$p" in
        base2new) "$PYTHON" -m spotlighter.results base2new --root "$OUTPUT" --datasets minibench --shots "$SHOTS" \
                      --trainers "$trainers_csv" --configs "$configs_csv" \
                      --seeds "$seeds_csv" --csv "$OUTPUT/minibench_base2new.csv" --no-published "${plot[@]}" ;;
        xd | dg) "$PYTHON" -m spotlighter.results "$p" --root "$OUTPUT" --source "$SOURCE" --shots "$SHOTS" \
                     --trainers "$trainers_csv" --configs "$configs_csv" \
                     --seeds "$seeds_csv" --csv "$OUTPUT/minibench_$p.csv" "${plot[@]}" ;;
    esac || { say "no $p table (see above)"; failed=$((failed + 1)); }
done
elapsed=$(( $(date +%s) - start ))
echo
say "total time $(fmt_s "$elapsed")"
[ "$failed" -eq 0 ] || { say "$failed run(s) failed"; exit 1; }
