"""The job graph of a protocol, the state of a job's output folder, and running one job.

A job is one ``train.py`` call with its own output folder. What to do with it is read from that
folder each time (so a re-run continues where the last one stopped, whoever ran it):

* finished (``result.json``, and for training ``Finish training`` in its log) with the same trailing
  options -> skipped; with other options -> refused (``FORCE=1`` re-runs it);
* an evaluation older than the checkpoint it evaluates -> stale: moved aside and redone;
* training with checkpoints but unfinished -> resumed (``train.py`` resumes from its output folder,
  and refuses if the settings in its checkpoint differ); with other trailing options than the
  interrupted run recorded -> changed: refused (``FORCE=1`` starts it over);
* stopped by a signal (``train.py`` exit status 75, a resumable checkpoint written) -> stopped; the
  SLURM job requeues itself after SIGUSR1 (spotlighter/preempt.py);
* locked by a live process (``train.py`` holds ``spotlighter.runlock.OutputLock`` on its folder)
  -> running elsewhere: never started twice.

Plain Python (no torch, no Dassl): the runner only starts processes.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .. import preempt, registry
from ..output_tree import (FINISH_SIGNAL, LOG_FILE, RESULT_FILE, ROLE_ALL, ROLE_BASE, ROLE_NEW, TEACHER_SEED,
                           ZERO_SHOT_SHOTS, base2new_seed_dir, base2new_top, distilled_seed_dir, fewshot_seed_dir,
                           source_seed_dir, target_config_dir, target_seed_dir, teacher_seed_dir)
from ..runlock import lock_holder

#: The trailing KEY VALUE options a job ran with: a finished job is only skipped when they match.
OPTIONS_FILE = "run-options.txt"
NO_OPTIONS = "none"
#: FORCE=1 and stale evaluations move a folder to $OUTPUT/<BACKUP_DIR>/<time>/<its path under $OUTPUT>:
#: outside the seed's parent folder, so CoOp's parse_test_res.py never counts a backup as a seed.
BACKUP_DIR = "backup"
RUN_LOG = "run-{ts}.log"
ELAPSED_PREFIX = "# elapsed "  # last line of a run log: "# elapsed <seconds> s, exit status <rc>"
TRAIN, EVAL = "train", "eval"
#: Cross-dataset with a distilling trainer: each target's student learns from the target's whole
#: unlabelled train split (the released PromptKD / tkmc cross-dataset protocol)
DISTILLED_SHOTS = 0


class InputError(ValueError):
    """Bad input: the message says what to do; exit status 2."""


@dataclass
class Settings:
    """Everything a protocol run depends on; built by cli.py from arguments and environment."""

    protocol: str
    trainer: str  # registered name
    trains: bool
    cfg: str
    cfg_file: str  # relative to the repository
    shots: int
    seeds: List[int]
    data: str
    output: str  # as passed to train.py: "output" (in the repository) or an absolute path
    python: List[str]
    extra: List[str]
    repo: str
    ts: str
    dataset: Optional[str] = None  # base2new
    source: Optional[str] = None  # xd / dg
    targets: List[str] = field(default_factory=list)
    force: bool = False
    dry_run: bool = False
    typed_trainer: str = ""
    #: a distilling trainer (PromptKD): base2new trains on all classes' unlabelled images, xd distils one
    #: student per target on its unlabelled train split, dg distils on the source's train images
    transductive: bool = False
    #: A teacher trained in this graph (TEACHER=train): (trainer CLI name, config, the student's cfg key)
    teacher: Optional[List[str]] = None
    #: fewshot: the shot counts, one training per (shots, seed) (``shots`` is the largest)
    shots_list: List[int] = field(default_factory=list)

    @property
    def options_text(self) -> str:
        return " ".join(self.extra) if self.extra else NO_OPTIONS


@dataclass
class Job:
    kind: str  # TRAIN (finished = Finish training + result.json) or EVAL (finished = result.json)
    dir: str  # output folder, as passed to train.py (relative to the repository or absolute)
    head: List[str]  # train.py arguments before the model arguments
    tail: List[str]  # train.py arguments after them
    seed: int
    dataset: str
    what: str  # "training on base", "evaluation on dtd", ...
    model_dir: Optional[str] = None  # the trained folder an evaluation loads
    deps: List[str] = field(default_factory=list)  # dirs of the jobs it waits for
    needs_trained: bool = False  # dg: its model_dir comes from another run (xd.sh), not this graph
    trainer: str = ""  # registered trainer name (the ETA's cost prior and per-trainer means)

    @property
    def name(self) -> str:
        return f"{self.kind} {self.dir}"


# ------------------------------------------------------------------------------------------------
# the graph
# ------------------------------------------------------------------------------------------------
def train_args(s: Settings, seed: int, dataset: str, out: str) -> List[str]:
    return ["--root", s.data, "--seed", str(seed), "--trainer", s.trainer,
            "--dataset-config-file", registry.dataset(dataset).config, "--config-file", s.cfg_file,
            "--output-dir", out]


def source_dir(s: Settings, seed: int) -> str:
    return source_seed_dir(s.output, s.source, s.trainer, s.cfg, s.shots, seed)


def eval_root(s: Settings) -> str:
    return target_config_dir(s.output, s.source, s.trainer, s.cfg, s.shots)


def base2new_job_dir(s: Settings, role: str, seed: int) -> str:
    return base2new_seed_dir(base2new_top(s.output), role, s.dataset, s.shots, s.trainer, s.cfg, seed)


def fewshot_job_dir(s: Settings, shots: int, seed: int) -> str:
    return fewshot_seed_dir(s.output, s.dataset, s.trainer, s.cfg, shots, seed)


def fewshot_jobs(s: Settings) -> List[Job]:
    """CoOp's few-shot protocol: per shot count and seed, train on K images of every class and test on
    all classes at the end of training. A zero-shot model trains nothing: one evaluation (the first
    seed; shots do not matter), in the ZERO_SHOT_SHOTS folder."""
    all_classes = ["DATASET.SUBSAMPLE_CLASSES", "all"]
    if not s.trains:
        seed = s.seeds[0]
        d = fewshot_job_dir(s, ZERO_SHOT_SHOTS, seed)
        return [Job(EVAL, d, train_args(s, seed, s.dataset, d), ["--eval-only"] + all_classes + s.extra, seed,
                    s.dataset, "evaluation on all classes")]
    jobs = []
    for shots in s.shots_list:
        for seed in s.seeds:
            d = fewshot_job_dir(s, shots, seed)
            jobs.append(Job(TRAIN, d, train_args(s, seed, s.dataset, d),
                            ["DATASET.NUM_SHOTS", str(shots)] + all_classes + s.extra, seed, s.dataset,
                            f"training on {shots} shots of all classes"))
    return jobs


def teacher_dir(s: Settings, dataset: str) -> str:
    """One teacher per dataset (and shots), shared by every seed and student: trained with seed 1."""
    return teacher_seed_dir(s.output, dataset, registry.trainer(s.teacher[0]).name, s.teacher[1], s.shots)


def teacher_job(s: Settings, dataset: str, subset: str) -> Job:
    t = registry.trainer(s.teacher[0])
    d = teacher_dir(s, dataset)
    args = ["--root", s.data, "--seed", str(TEACHER_SEED), "--trainer", t.name,
            "--dataset-config-file", registry.dataset(dataset).config, "--config-file", t.config_file(s.teacher[1]),
            "--output-dir", d]
    return Job(TRAIN, d, args, ["DATASET.NUM_SHOTS", str(s.shots), "DATASET.SUBSAMPLE_CLASSES", subset],
               TEACHER_SEED, dataset, f"training the {t.name} teacher on {subset}", trainer=t.name)


def build_graph(s: Settings) -> List[Job]:
    """Jobs in the order a single device runs them (per seed: training, then its evaluations)."""
    if s.protocol == "fewshot":
        jobs = fewshot_jobs(s)
        for job in jobs:
            job.trainer = s.trainer
        return jobs
    jobs: List[Job] = []
    teacher_opts: List[str] = []
    teacher_deps: List[str] = []
    if s.teacher:
        dataset = s.dataset if s.protocol == "base2new" else s.source
        # base-to-novel: the teacher learns the base classes' labels; cross-dataset: all the source's
        tj = teacher_job(s, dataset, "base" if s.protocol == "base2new" else "all")
        jobs.append(tj)
        teacher_opts, teacher_deps = [s.teacher[2], tj.dir], [tj.dir]
    shots = ["DATASET.NUM_SHOTS", str(s.shots)]
    first_kind = TRAIN if s.trains else EVAL
    first_tail = [] if s.trains else ["--eval-only"]
    model = (lambda d: d) if s.trains else (lambda d: None)
    first_what = "training on" if s.trains else "evaluation on"  # zero-shot CLIP trains nothing
    for seed in s.seeds:
        if s.protocol == "base2new" and s.transductive:
            dist = base2new_job_dir(s, ROLE_ALL, seed)
            jobs.append(Job(TRAIN, dist, train_args(s, seed, s.dataset, dist),
                            shots + ["DATASET.SUBSAMPLE_CLASSES", "all"] + teacher_opts + s.extra,
                            seed, s.dataset, "training on all classes (unlabelled)", deps=list(teacher_deps)))
            for role, subset in ((ROLE_BASE, "base"), (ROLE_NEW, "new")):
                d = base2new_job_dir(s, role, seed)
                jobs.append(Job(EVAL, d, train_args(s, seed, s.dataset, d),
                                ["--eval-only"] + shots + ["DATASET.SUBSAMPLE_CLASSES", subset] + teacher_opts + s.extra,
                                seed, s.dataset, f"evaluation on {subset}", model_dir=dist, deps=[dist]))
        elif s.protocol == "base2new":
            tr, te = base2new_job_dir(s, ROLE_BASE, seed), base2new_job_dir(s, ROLE_NEW, seed)
            jobs.append(Job(first_kind, tr, train_args(s, seed, s.dataset, tr),
                            first_tail + shots + ["DATASET.SUBSAMPLE_CLASSES", "base"] + s.extra,
                            seed, s.dataset, f"{first_what} base"))
            jobs.append(Job(EVAL, te, train_args(s, seed, s.dataset, te),
                            ["--eval-only"] + shots + ["DATASET.SUBSAMPLE_CLASSES", "new"] + s.extra,
                            seed, s.dataset, "evaluation on new", model_dir=model(tr), deps=[tr]))
        elif s.protocol == "xd" and s.transductive:
            # as PromptKD: the (source) teacher's text for each target's classes, a student distilled
            # on that target's unlabelled train images, evaluated on its test split
            for t in s.targets:
                dist = distilled_seed_dir(s.output, t, s.trainer, s.cfg, s.shots, seed)
                jobs.append(Job(TRAIN, dist, train_args(s, seed, t, dist),
                                ["DATASET.NUM_SHOTS", str(DISTILLED_SHOTS)] + teacher_opts + s.extra, seed, t,
                                f"distilling on {t} (unlabelled)", deps=list(teacher_deps)))
                d = target_seed_dir(s.output, s.source, s.trainer, s.cfg, s.shots, t, seed)
                jobs.append(Job(EVAL, d, train_args(s, seed, t, d), ["--eval-only"] + teacher_opts + s.extra, seed, t,
                                f"evaluation on {t}", model_dir=dist, deps=[dist]))
        else:
            src = source_dir(s, seed)
            deps: List[str] = []
            # dg with a distilling trainer: its student learns from the source's unlabelled train images
            # here (never from the targets' test images), then is evaluated on every target
            if s.protocol == "xd" or (s.protocol == "dg" and s.transductive):
                jobs.append(Job(first_kind, src, train_args(s, seed, s.source, src),
                                first_tail + shots + teacher_opts + s.extra, seed, s.source,
                                f"{first_what} {s.source}", deps=list(teacher_deps)))
                deps = [src]
            for t in s.targets:
                d = target_seed_dir(s.output, s.source, s.trainer, s.cfg, s.shots, t, seed)
                jobs.append(Job(EVAL, d, train_args(s, seed, t, d), ["--eval-only"] + teacher_opts + s.extra, seed, t,
                                f"evaluation on {t}", model_dir=model(src), deps=list(deps),
                                needs_trained=s.protocol == "dg" and s.trains and not s.transductive))
    for job in jobs:
        job.trainer = job.trainer or s.trainer
    return jobs


# ------------------------------------------------------------------------------------------------
# state of an output folder
# ------------------------------------------------------------------------------------------------
def logs(d: str) -> List[str]:
    return glob.glob(os.path.join(glob.escape(d), LOG_FILE + "*"))


def newest_log(d: str) -> Optional[str]:
    found = logs(d)
    return max(found, key=os.path.getmtime) if found else None


def train_finished(d: str) -> bool:
    if not os.path.isfile(os.path.join(d, RESULT_FILE)):
        return False
    for log in logs(d):
        try:
            with open(log, errors="replace") as f:
                if any(FINISH_SIGNAL in line for line in f):
                    return True
        except OSError:
            continue
    return False


def finished(kind: str, d: str) -> bool:
    return train_finished(d) if kind == TRAIN else os.path.isfile(os.path.join(d, RESULT_FILE))


def has_checkpoint(d: str) -> bool:
    return bool(glob.glob(os.path.join(glob.escape(d), "*", "model.pth.tar-*")))


def last_epoch(d: str) -> Optional[int]:
    """The epoch training wrote: ``<module>/checkpoint``, else the highest ``model.pth.tar-N``."""
    for f in sorted(glob.glob(os.path.join(glob.escape(d), "*", "checkpoint"))):
        try:
            with open(f) as fh:
                name = fh.readline().strip()
        except OSError:
            continue
        m = re.fullmatch(r"model\.pth\.tar-(\d+)", name)
        if m:
            return int(m.group(1))
    epochs = [int(m.group(1)) for p in glob.glob(os.path.join(glob.escape(d), "*", "model.pth.tar-*"))
              if (m := re.search(r"model\.pth\.tar-(\d+)$", p))]
    return max(epochs) if epochs else None


def model_args(d: str) -> Tuple[List[str], Optional[str]]:
    """(``--model-dir``/``--load-epoch`` of a trained folder, the checkpoint file it loads).

    With TEST.FINAL_MODEL best_val training deployed ``model-best.pth.tar``: that one is evaluated.
    ``([], None)`` when the folder has no checkpoint.
    """
    best = sorted(glob.glob(os.path.join(glob.escape(d), "*", "model-best.pth.tar")))
    if best:
        return ["--model-dir", d], best[0]
    ep = last_epoch(d)
    if ep is None:
        return [], None
    ckpt = sorted(glob.glob(os.path.join(glob.escape(d), "*", f"model.pth.tar-{ep}")))
    return ["--model-dir", d, "--load-epoch", str(ep)], ckpt[0] if ckpt else None


def config_max_epoch(s: Settings) -> Optional[str]:
    """OPTIM.MAX_EPOCH from the trailing options, else from the trainer config (dry runs only)."""
    for k, v in zip(s.extra[::2], s.extra[1::2]):
        if k == "OPTIM.MAX_EPOCH":
            return v
    try:
        with open(os.path.join(s.repo, s.cfg_file)) as f:
            in_optim = False
            for line in f:
                if re.match(r"^OPTIM:", line):
                    in_optim = True
                elif re.match(r"^[^\s#]", line):
                    in_optim = False
                elif in_optim and (m := re.match(r"^\s+MAX_EPOCH:\s*(\S+)", line)):
                    return m.group(1)
    except OSError:
        pass
    return None


def recorded_options(d: str) -> Optional[str]:
    try:
        with open(os.path.join(d, OPTIONS_FILE)) as f:
            return f.read().strip()
    except OSError:
        return None


@dataclass
class State:
    name: str  # absent | finished | mismatch | changed | stale | running | resume | rerun
    note: str = ""


def inspect(job: Job, s: Settings) -> State:
    d = job.dir
    if not os.path.exists(d):
        return State("absent")
    holder = lock_holder(d)
    if holder is not None:
        return State("running", f"running elsewhere: {d} is locked by {holder.describe()}")
    if finished(job.kind, d):
        opts = recorded_options(d)
        if opts is not None and opts != s.options_text:
            return State("mismatch", f"finished with other trailing options ({opts}) than now "
                                     f"({s.options_text}); FORCE=1 re-runs it (the old folder is moved to "
                                     f"{s.output}/{BACKUP_DIR}/), or use another OUTPUT")
        if job.kind == EVAL and job.model_dir:
            _, ckpt = model_args(job.model_dir)
            if ckpt and os.path.getmtime(ckpt) > os.path.getmtime(os.path.join(d, RESULT_FILE)):
                return State("stale", f"{ckpt} is newer than {d}/{RESULT_FILE} (the model was retrained)")
        return State("finished")
    if job.kind == TRAIN and has_checkpoint(d):
        opts = recorded_options(d)
        if opts is not None and opts != s.options_text:
            return State("changed", f"{d} holds an interrupted training with other trailing options ({opts}) than "
                                    f"now ({s.options_text}): resuming it would mix two runs; FORCE=1 starts it "
                                    f"over (the old folder is moved to {s.output}/{BACKUP_DIR}/), or use another "
                                    "OUTPUT")
        return State("resume", f"{d} has checkpoints but no finished run; re-running into it resumes training")
    return State("rerun", f"{d} exists but holds no finished result")


def backup_path(s: Settings, d: str) -> str:
    rel = os.path.relpath(d, s.output)
    dst = os.path.join(s.output, BACKUP_DIR, s.ts, rel)
    if os.path.exists(dst):
        dst = f"{dst}-{os.getpid()}"
    return dst


def move_aside(s: Settings, d: str, say: Callable[[str], None], why: str) -> str:
    dst = backup_path(s, d)
    if s.dry_run:
        print(quote(["mkdir", "-p", os.path.dirname(dst)]))
        print(quote(["mv", d, dst]))
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(d, dst)
        say(f"{why}: moved the old {d} aside to {dst}")
    return dst


def quote(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


# ------------------------------------------------------------------------------------------------
# running one job (local launcher threads, and `python -m spotlighter.run job SPEC` on SLURM)
# ------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    status: str  # done | skipped | failed | refused | changed | stopped | running
    message: str = ""
    seconds: float = 0.0
    ran: bool = False
    stop_signal: Optional[int] = None  # stopped: the signal train.py stopped on


@contextmanager
def forwarding(proc: subprocess.Popen, received: List[int], trains: bool = True):
    """While the job runs: pass :data:`spotlighter.preempt.STOP_SIGNALS` this runner gets on to the
    job's process (``train.py`` checkpoints and exits 75), and note them in ``received``. An
    evaluation (``trains`` False) has nothing to save: the time-limit warning does not stop it."""
    def forward(signum, _frame):
        received.append(signum)
        if signum == preempt.REQUEUE_SIGNAL and not trains:
            return
        try:
            proc.send_signal(signum)
        except OSError:  # already gone
            pass

    previous = {sig: signal.signal(sig, forward) for sig in preempt.STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def command(job: Job, s: Settings, load: Sequence[str]) -> List[str]:
    return [*s.python, "train.py", *job.head, *load, *job.tail]


def write_line(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text + "\n")


def popen(cmd: Sequence[str], env: Dict[str, str]) -> subprocess.Popen:
    """The default way to start a job: a fresh interpreter, stdout and stderr on one pipe."""
    return subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def write_options(job: Job, s: Settings) -> None:
    with open(os.path.join(job.dir, OPTIONS_FILE), "w") as f:
        f.write(s.options_text + "\n")


def run_one(job: Job, s: Settings, say: Callable[[str], None], echo: bool = True,
            env: Optional[Dict[str, str]] = None, start: Optional[Callable] = None,
            forward_signals: bool = False, announce: bool = True) -> Outcome:
    """Decide from the folder what the job needs, and run it (``echo``: its output on our stdout;
    ``announce``: say "run (<kind>): <dir>" and "skip (finished): <dir>" as it starts or skips).

    ``start(cmd, env)`` starts the job's process (default: :func:`popen`; the local launcher's
    pre-imported forkserver, spotlighter.run.fast, has the same interface); its ``stdout`` carries
    the job's stdout and stderr. ``forward_signals`` (main thread only; the SLURM job): stop signals
    this process gets are passed on to the job's process.

    ``run-options.txt`` says what the folder's run ran with: written before a fresh run, and after a
    resumed one has finished (a resume ``train.py`` refuses leaves the old run's record alone).
    """
    st = inspect(job, s)
    if st.name == "running":
        return Outcome("running", st.note)
    if st.name == "mismatch":
        return Outcome("refused", f"{job.name}: {st.note}")
    if st.name == "changed":
        return Outcome("changed", f"{job.name}: {st.note}")
    if st.name == "finished":
        if announce:
            say(f"skip (finished): {job.dir}")
        return Outcome("skipped")
    load: List[str] = []
    if job.model_dir:
        load, ckpt = model_args(job.model_dir)
        if not load:
            return Outcome("failed", f"{job.name}: no model.pth.tar-N checkpoint in {job.model_dir}/*/ to evaluate")
    try:
        if st.name == "stale":
            say(f"stale: {st.note}; re-evaluating")
            move_aside(s, job.dir, say, "stale evaluation")
        elif st.name in ("resume", "rerun"):
            say(f"{'resume' if st.name == 'resume' else 're-run'}: {st.note}")
        os.makedirs(job.dir, exist_ok=True)
        if st.name != "resume":
            write_options(job, s)
        runlog = os.path.join(job.dir, RUN_LOG.format(ts=s.ts))
        cmd = command(job, s, load)
        write_line(runlog, quote(cmd))
    except OSError as exc:
        return Outcome("failed", f"{job.name}: cannot write into {job.dir}: {exc.strerror or exc}")
    if announce:
        say(f"run ({job.kind}): {job.dir}")
    t0 = time.monotonic()
    proc = None
    received: List[int] = []
    try:
        with open(runlog, "ab") as log:
            proc = (start or popen)(cmd, {**os.environ, **(env or {})})
            with forwarding(proc, received, job.kind == TRAIN) if forward_signals else nullcontext():
                out = sys.stdout.buffer if echo else None
                for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                    log.write(chunk)
                    log.flush()
                    if out is not None:
                        out.write(chunk)
                        out.flush()
                rc = proc.wait()
        dt = time.monotonic() - t0
        write_line(runlog, f"{ELAPSED_PREFIX}{dt:.1f} s, exit status {rc}")
    except FileNotFoundError as exc:
        return Outcome("failed", f"{job.name}: cannot start {s.python[0]!r}: {exc.strerror}; set PYTHON", ran=True)
    except OSError as exc:  # e.g. the disk is full: stop the job, whose log we cannot keep
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        return Outcome("failed", f"{job.name}: cannot write {runlog}: {exc.strerror or exc}", ran=True)
    if rc == preempt.EXIT_RESUMABLE and job.kind == TRAIN:
        sig = received[0] if received else None
        by = f"by {preempt.signal_name(sig)} " if sig is not None else ""
        return Outcome("stopped", f"{job.name}: stopped {by}with a resumable checkpoint; re-running resumes it "
                                  f"(see {runlog})", dt, ran=True, stop_signal=sig)
    if rc != 0:
        holder = lock_holder(job.dir)
        if holder is not None:  # another process took the folder between our check and train.py's lock
            return Outcome("running", f"running elsewhere: {job.dir} is locked by {holder.describe()}",
                           dt, ran=True)
        dassl = newest_log(job.dir)
        return Outcome("failed", f"{job.name}: exit status {rc}; see {runlog}"
                                 + (f" (Dassl log: {dassl})" if dassl else ""), dt, ran=True)
    if not finished(job.kind, job.dir):
        want = RESULT_FILE if job.kind == EVAL else f"'{FINISH_SIGNAL}' in {LOG_FILE} and {RESULT_FILE}"
        return Outcome("failed", f"{job.name}: train.py exited 0 but the folder lacks {want}; see {runlog}",
                       dt, ran=True)
    if st.name == "resume":
        try:
            write_options(job, s)
        except OSError as exc:
            return Outcome("failed", f"{job.name}: cannot write {OPTIONS_FILE}: {exc.strerror or exc}", dt, ran=True)
    return Outcome("done", seconds=dt, ran=True)


def _run_log_ends(d: str) -> Iterator[Tuple[str, float, bool]]:
    """(run log, seconds, exit status 0) of each run log of a folder that ends in its elapsed line."""
    for log in glob.glob(os.path.join(glob.escape(d), "run-*.log")):
        try:
            with open(log) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        if lines and lines[-1].startswith(ELAPSED_PREFIX):
            try:
                seconds = float(lines[-1][len(ELAPSED_PREFIX):].split()[0])
            except (ValueError, IndexError):
                continue
            yield log, seconds, lines[-1].endswith("exit status 0")


def elapsed_total(d: str) -> Optional[float]:
    """Seconds every run of a folder took together (a resumed training's pieces add up to the whole
    job), or None when no run log says."""
    runs = [seconds for _, seconds, _ in _run_log_ends(d)]
    return sum(runs) if runs else None


def elapsed_of(d: str) -> Optional[float]:
    """Seconds the last successful run of a folder took (from its run log), or None."""
    done = [(os.path.getmtime(log), seconds) for log, seconds, ok in _run_log_ends(d) if ok]
    return max(done)[1] if done else None


def job_to_dict(job: Job) -> dict:
    return asdict(job)


def settings_to_dict(s: Settings) -> dict:
    return asdict(s)
