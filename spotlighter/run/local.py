"""The local launcher: one job at a time (default), or ``JOBS=N`` / ``GPUS="0 1"`` at a time.

An evaluation starts when the training it loads has finished; a job whose training failed, was
refused or runs elsewhere is not started (and says why). With more than one slot each job's output
goes to its run log only (``<dir>/run-<time>.log``) and each device's jobs get
``CUDA_VISIBLE_DEVICES`` in their own environment; the runner's environment is never changed.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from .jobs import Job, Outcome, Settings, run_one

OK = ("done", "skipped")
BLOCKED_VERB = {"failed": "failed", "refused": "was finished with other trailing options",
                "running": "is running elsewhere", "blocked": "was not run"}


def fmt_seconds(sec: float) -> str:
    sec = int(round(sec))
    h, rem = divmod(sec, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@dataclass
class Progress:
    """Jobs done / running / queued, and an ETA from the jobs that ran (per kind: train, eval)."""

    total: int
    slots: int
    durations: Dict[str, List[float]] = field(default_factory=dict)

    def add(self, kind: str, seconds: float) -> None:
        self.durations.setdefault(kind, []).append(seconds)

    def mean(self, kind: str) -> Optional[float]:
        d = self.durations.get(kind)
        return sum(d) / len(d) if d else None

    def eta(self, queued: Sequence[Job], running: Dict[str, tuple]) -> Optional[float]:
        work = 0.0
        for job in queued:
            m = self.mean(job.kind)
            if m is None:
                return None
            work += m
        now = time.monotonic()
        for job, _dev, t0 in running.values():
            m = self.mean(job.kind)
            if m is None:
                return None
            work += max(m - (now - t0), 0.0)
        return work / max(min(self.slots, len(queued) + len(running)), 1)

    def line(self, done: int, queued: Sequence[Job], running: Dict[str, tuple]) -> str:
        eta = self.eta(queued, running)
        if not queued and not running:
            tail = ""
        elif eta is None:
            kinds = sorted({j.kind for j in queued} | {j.kind for j, _d, _t in running.values()})
            unknown = [k for k in kinds if self.mean(k) is None]
            tail = f"; ETA when a {'/'.join(unknown)} job has finished"
        else:
            tail = f"; ETA {fmt_seconds(eta)}"
        return f"progress: {done}/{self.total} finished, {len(running)} running, {len(queued)} queued{tail}"


def run_local(jobs: List[Job], s: Settings, say: Callable[[str], None], slots: int = 1,
              gpus: Sequence[str] = (), known: Optional[Dict[str, Outcome]] = None) -> Dict[str, Outcome]:
    """Run the graph; returns every job's outcome by folder (``blocked``: a dependency did not finish).

    ``known``: outcomes decided before (e.g. a folder found locked by FORCE=1); those jobs are not run.
    """
    slots = max(1, slots)
    devices: List[Optional[str]] = [gpus[i % len(gpus)] for i in range(slots)] if gpus else [None] * slots
    echo = slots == 1
    lock = threading.Lock()

    def locked_say(msg: str) -> None:
        with lock:
            say(msg)

    done_q: "queue.Queue[tuple]" = queue.Queue()
    outcomes: Dict[str, Outcome] = dict(known or {})
    pending = [j for j in jobs if j.dir not in outcomes]
    running: Dict[str, tuple] = {}  # dir -> (job, device, start)
    progress = Progress(total=len(jobs), slots=slots)
    by_dir = {j.dir: j for j in jobs}

    def work(job: Job, dev: Optional[str]) -> None:
        env = {"CUDA_VISIBLE_DEVICES": dev} if dev is not None else None
        try:
            out = run_one(job, s, locked_say, echo=echo, env=env)
        except Exception as exc:  # a bug must not hang the scheduler
            out = Outcome("failed", f"{job.name}: runner error: {exc!r}")
        done_q.put((job, out, dev))

    while pending or running:
        started = True
        while started:
            started = False
            for job in list(pending):
                bad = [d for d in job.deps if d in outcomes and outcomes[d].status not in OK]
                if bad:
                    pending.remove(job)
                    dep = by_dir[bad[0]]
                    verb = BLOCKED_VERB.get(outcomes[bad[0]].status, "did not finish")
                    outcomes[job.dir] = Outcome("blocked", f"{job.name}: not run: {dep.what} {verb}")
                    locked_say(f"seed {job.seed}: {dep.what} {verb}, so its {job.what} is not run")
                    started = True
                    continue
                if all(d in outcomes for d in job.deps) and devices:
                    pending.remove(job)
                    dev = devices.pop(0)
                    running[job.dir] = (job, dev, time.monotonic())
                    if slots > 1:
                        locked_say(f"start ({job.kind}{', GPU ' + dev if dev is not None else ''}): {job.dir}")
                    threading.Thread(target=work, args=(job, dev), daemon=True).start()
                    started = True
                    if not devices:
                        break
        if not running:
            break
        job, out, dev = done_q.get()
        running.pop(job.dir)
        devices.append(dev)
        outcomes[job.dir] = out
        if out.status == "done":
            progress.add(job.kind, out.seconds)
        if out.ran:
            n_done = len(outcomes)
            verdict = {"done": "finished", "failed": "FAILED"}.get(out.status, out.status)
            locked_say(f"{verdict} ({job.kind}, {fmt_seconds(out.seconds)}): {job.dir}")
            locked_say(progress.line(n_done, pending, running))
    return outcomes
