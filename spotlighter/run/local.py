"""The local launcher: one job at a time (default), or ``JOBS=N`` / ``GPUS="0 1"`` at a time.

An evaluation starts when the training it loads has finished; a job whose training failed, was
refused or runs elsewhere is not started (and says why). With more than one slot each job's output
goes to its run log only (``<dir>/run-<time>.log``) and each device's jobs get
``CUDA_VISIBLE_DEVICES`` in their own environment; the runner's environment is never changed.
How a job's process starts is the caller's choice (``start``): a fresh ``PYTHON train.py ...``
process, or a child of spotlighter.run.fast's pre-imported fork server (cli.job_starter).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..registry import job_cost
from .jobs import Job, Outcome, Settings, elapsed_total, run_one

OK = ("done", "skipped")
BLOCKED_VERB = {"failed": "failed", "refused": "was finished with other trailing options",
                "changed": "holds an interrupted run with other trailing options",
                "stopped": "was stopped by a signal (re-run to resume it)",
                "running": "is running elsewhere", "blocked": "was not run"}


def fmt_seconds(sec: float) -> str:
    sec = int(round(sec))
    h, rem = divmod(sec, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@dataclass
class Progress:
    """Jobs done / running / queued, and an ETA from the jobs that ran.

    A job's expected time is the mean of the finished jobs of the same (trainer, kind), each timed as
    the sum of its folder's run logs (a resumed training counts whole), jobs finished by an earlier
    run included; before one has finished, the trainer's cost prior (spotlighter/registry.py) times
    the measured seconds per unit of prior of the jobs that did finish. No ETA before any job
    finished.
    """

    total: int
    slots: int
    durations: Dict[Tuple[str, str], List[float]] = field(default_factory=dict)

    @staticmethod
    def key(job: Job) -> Tuple[str, str]:
        return job.trainer, job.kind

    def add(self, job: Job, seconds: float) -> None:
        self.durations.setdefault(self.key(job), []).append(seconds)

    def mean(self, key: Tuple[str, str]) -> Optional[float]:
        d = self.durations.get(key)
        return sum(d) / len(d) if d else None

    def seconds_per_cost(self) -> Optional[float]:
        """Measured seconds per unit of cost prior: the mean over the (trainer, kind) pairs timed."""
        rates = [self.mean(k) / job_cost(*k) for k in self.durations if self.durations[k]]
        return sum(rates) / len(rates) if rates else None

    def expected(self, job: Job) -> Optional[float]:
        m = self.mean(self.key(job))
        if m is not None:
            return m
        rate = self.seconds_per_cost()
        return None if rate is None else rate * job_cost(job.trainer, job.kind)

    def eta(self, queued: Sequence[Job], running: Dict[str, tuple]) -> Optional[float]:
        work = 0.0
        for job in queued:
            e = self.expected(job)
            if e is None:
                return None
            work += e
        now = time.monotonic()
        for job, _dev, t0 in running.values():
            e = self.expected(job)
            if e is None:
                return None
            work += max(e - (now - t0), 0.0)
        return work / max(min(self.slots, len(queued) + len(running)), 1)

    def line(self, done: int, queued: Sequence[Job], running: Dict[str, tuple]) -> str:
        eta = self.eta(queued, running)
        if not queued and not running:
            tail = ""
        elif eta is None:
            tail = "; ETA when a job has finished"
        else:
            tail = f"; ETA {fmt_seconds(eta)}"
        return f"progress: {done}/{self.total} finished, {len(running)} running, {len(queued)} queued{tail}"


def finish_line(job: Job, out: Outcome, detail: str = "") -> str:
    """``finished (train, 2m51s): <detail or folder>`` (``FAILED``, ``stopped``, ...)."""
    verdict = {"done": "finished", "failed": "FAILED"}.get(out.status, out.status)
    return f"{verdict} ({job.kind}, {fmt_seconds(out.seconds)}): {detail or job.dir}"


def run_local(jobs: List[Job], s: Settings, say: Callable[[str], None], slots: int = 1,
              gpus: Sequence[str] = (), known: Optional[Dict[str, Outcome]] = None,
              start: Optional[Callable] = None, echo: Optional[bool] = None,
              settings_of: Optional[Callable[[Job], Settings]] = None,
              on_start: Optional[Callable[[Job], None]] = None,
              on_outcome: Optional[Callable[[Job, Outcome], None]] = None,
              detail: Optional[Callable[[Job, Outcome], str]] = None) -> Dict[str, Outcome]:
    """Run the graph; returns every job's outcome by folder (``blocked``: a dependency did not finish).

    ``known``: outcomes decided before (e.g. a folder found locked by FORCE=1); those jobs are not run.
    ``start``: how a job's process is started (run_one's; spotlighter.run.fast's fork server or a
    fresh interpreter). ``echo``: job output on our stdout too (default: with one slot).
    ``settings_of``: each job's Settings when the graph mixes runs (the demo); default ``s``.
    ``on_start`` / ``on_outcome``: called (under the output lock) when a job starts / gets its outcome.
    Each job that ran gets one line when it ends: its verdict, ``detail(job, outcome)`` (default its
    folder) and the progress counts, taken once the freed slots have started their next jobs.
    Jobs found finished are timed from their run logs, so a re-run's ETA starts from what they took.
    """
    slots = max(1, slots)
    devices: List[Optional[str]] = [gpus[i % len(gpus)] for i in range(slots)] if gpus else [None] * slots
    echo = slots == 1 if echo is None else echo
    settings_of = settings_of or (lambda _job: s)
    missing = sorted({d for j in jobs for d in j.deps} - {j.dir for j in jobs} - set(known or {}))
    if missing:  # a job would wait for ever: a bug of the graph builder
        raise ValueError(f"jobs depend on folders that are not in the graph: {', '.join(missing)}")
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
            out = run_one(job, settings_of(job), locked_say, echo=echo, env=env, start=start, announce=echo)
        except Exception as exc:  # a bug must not hang the scheduler
            out = Outcome("failed", f"{job.name}: runner error: {exc!r}")
        done_q.put((job, out, dev))

    ended: List[str] = []  # finish lines waiting for the next jobs to start (their progress counts them)
    while True:
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
                    if on_outcome:
                        with lock:
                            on_outcome(job, outcomes[job.dir])
                    started = True
                    continue
                if all(d in outcomes for d in job.deps) and devices:
                    pending.remove(job)
                    dev = devices.pop(0)
                    running[job.dir] = (job, dev, time.monotonic())
                    if on_start:
                        with lock:
                            on_start(job)
                    threading.Thread(target=work, args=(job, dev), daemon=True).start()
                    started = True
                    if not devices:
                        break
        for line in ended:
            locked_say(f"{line} | {progress.line(len(outcomes), pending, running)}")
        ended.clear()
        if not running:
            break
        job, out, dev = done_q.get()
        running.pop(job.dir)
        devices.append(dev)
        outcomes[job.dir] = out
        if out.status in OK:
            took = elapsed_total(job.dir) or out.seconds  # a skipped job's own seconds are 0
            if took:
                progress.add(job, took)
        if on_outcome:
            with lock:
                on_outcome(job, out)
        if out.ran:
            ended.append(finish_line(job, out, detail(job, out) if detail else ""))
    skipped = sum(1 for j in jobs if outcomes.get(j.dir, Outcome("")).status == "skipped")
    if skipped and not echo:  # with echo, run_one said it of each
        locked_say(f"skip (finished): {skipped} job(s) whose folders hold a finished run")
    return outcomes
