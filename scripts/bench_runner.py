#!/usr/bin/env python
"""Wall time of the tiny base-to-novel protocol: JOBS=1 vs JOBS=2, fork server vs subprocesses.

    python scripts/bench_runner.py [--seeds "1 2 3"] [--trainer coop] [--jobs "1 2"] [--fork "1 0"] [--work DIR]

Runs scripts/base2new.sh on the tests' tiny MiniBench-format dataset and tiny CLIP (real train.py
and Dassl, 1 epoch, 32 px) into a fresh output folder per setting (every JOBS value with every
RUNNER_FORK value: 1 = jobs forked from the pre-imported server, 0 = a fresh interpreter per job),
one after another, and prints each whole-process wall time and the ratios. The few-shot cache is
built by a first, untimed run, so every timed run starts from the same data. Needs Dassl (README: Install).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]


def launcher(fork: str) -> str:
    return "subprocess" if fork == "0" else "fork"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1 2 3")
    p.add_argument("--trainer", default="coop")
    p.add_argument("--cfg", default="minibench_ep10_ctx4")
    p.add_argument("--jobs", default="1 2", help="the JOBS values to compare")
    p.add_argument("--fork", default="1 0", help="the RUNNER_FORK values to compare (1: fork server, 0: subprocess)")
    p.add_argument("--work", default="", help="folder for data and outputs (default: a temporary one)")
    a = p.parse_args()
    from tiny_clip import save_tiny_clip
    from tiny_data import make_tiny_minibench

    work = a.work or tempfile.mkdtemp(prefix="bench-runner-")
    data = os.path.join(work, "data")
    if not os.path.isdir(os.path.join(data, "minibench")):
        make_tiny_minibench(data)
    clip = save_tiny_clip(os.path.join(work, "tiny_clip.pt"))
    opts = ["INPUT.SIZE", "(32, 32)", "OPTIM.MAX_EPOCH", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
            "DATALOADER.NUM_WORKERS", "0", "MODEL.BACKBONE.PATH", clip]

    def run(jobs: str, fork: str, out: str) -> float:
        env = {**os.environ, "DATA": data, "OUTPUT": out, "SEEDS": a.seeds, "CFG": a.cfg, "JOBS": jobs,
               "RUNNER_FORK": fork, "PYTHON": sys.executable}
        t0 = time.monotonic()
        r = subprocess.run(["bash", os.path.join(REPO, "scripts", "base2new.sh"), a.trainer, "minibench", "4", *opts],
                           env=env, capture_output=True, text=True)
        dt = time.monotonic() - t0
        if r.returncode != 0:
            print(r.stdout[-3000:] + r.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"JOBS={jobs} RUNNER_FORK={fork}: failed (exit {r.returncode})")
        used = "fork" if "jobs start from a fork server" in r.stdout else "subprocess"
        if used != ("fork" if fork != "0" else "subprocess"):
            raise SystemExit(f"RUNNER_FORK={fork}: the runner used the {used} path")
        return dt

    run("1", "0", os.path.join(work, f"output-warmup-{time.strftime('%H%M%S')}"))  # the few-shot cache
    rows = []
    load = os.getloadavg()
    for jobs in a.jobs.split():
        for fork in a.fork.split():
            dt = run(jobs, fork, os.path.join(work, f"output-jobs{jobs}-fork{fork}-{time.strftime('%H%M%S')}"))
            rows.append((jobs, fork, dt))
            print(f"JOBS={jobs} RUNNER_FORK={fork}: {dt:.1f} s wall ({len(a.seeds.split()) * 2} jobs)", flush=True)
    wall = {(j, f): dt for j, f, dt in rows}
    ref = rows[0]
    print(f"\n{'JOBS':>5} {'launcher':>10} {'wall s':>8} {f'vs JOBS={ref[0]} {launcher(ref[1])}':>24} "
          f"{'subprocess/fork':>16}")
    for jobs, fork, dt in rows:
        vs_sub = f"{wall[(jobs, '0')] / dt:15.2f}x" if fork != "0" and (jobs, "0") in wall else ""
        print(f"{jobs:>5} {launcher(fork):>10} {dt:8.1f} {ref[2] / dt:23.2f}x {vs_sub:>16}")
    print(f"(cpus: {os.cpu_count()}; 1/5/15-min load average before: {' '.join(f'{x:.2f}' for x in load)}, "
          f"after: {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
