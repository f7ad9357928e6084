#!/usr/bin/env python
"""Wall time of the tiny base-to-novel protocol with JOBS=1 and JOBS=2, side by side.

    python scripts/bench_runner.py [--seeds "1 2 3"] [--trainer coop] [--work DIR]

Runs scripts/base2new.sh on the tests' tiny MiniBench-format dataset and tiny CLIP (real train.py
and Dassl, 1 epoch, 32 px) into a fresh output folder per setting, and prints each whole-process
wall time and their ratio. Needs Dassl (README: Install).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1 2 3")
    p.add_argument("--trainer", default="coop")
    p.add_argument("--cfg", default="minibench_ep10_ctx4")
    p.add_argument("--jobs", default="1 2", help="the JOBS values to compare")
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
    rows = []
    load = os.getloadavg()
    for jobs in a.jobs.split():
        out = os.path.join(work, f"output-jobs{jobs}-{time.strftime('%H%M%S')}")
        env = {**os.environ, "DATA": data, "OUTPUT": out, "SEEDS": a.seeds, "CFG": a.cfg, "JOBS": jobs}
        t0 = time.monotonic()
        r = subprocess.run(["bash", os.path.join(REPO, "scripts", "base2new.sh"), a.trainer, "minibench", "4", *opts],
                           env=env, capture_output=True, text=True)
        dt = time.monotonic() - t0
        if r.returncode != 0:
            print(r.stdout[-3000:] + r.stderr[-2000:], file=sys.stderr)
            print(f"JOBS={jobs}: failed (exit {r.returncode})", file=sys.stderr)
            return 1
        rows.append((jobs, dt))
        print(f"JOBS={jobs}: {dt:.1f} s wall ({len(a.seeds.split()) * 2} jobs)", flush=True)
    print(f"\n{'JOBS':>6} {'wall s':>8} {'vs JOBS=' + rows[0][0]:>12}")
    for jobs, dt in rows:
        print(f"{jobs:>6} {dt:8.1f} {rows[0][1] / dt:11.2f}x")
    print(f"(cpus: {os.cpu_count()}; 1/5/15-min load average before: {' '.join(f'{x:.2f}' for x in load)}, "
          f"after: {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
