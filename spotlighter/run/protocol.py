"""What every way of running a protocol shares (``cli.py`` runs one, ``demo.py`` all three on
MiniBench, ``slurm.py`` submits one): the settings from the arguments and the environment, the console
of a run (:class:`ProtocolRun`), the plain summary, the final report and its exit status."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from .. import machine, registry
from ..output_tree import ROLE_BASE, ROLE_NEW
from ..results.stats import harmonic_mean, summarize
from .jobs import (InputError, Job, Outcome, Settings, base2new_job_dir, config_max_epoch, eval_root, inspect,
                   model_args, move_aside, newest_log, quote, source_dir, train_args, train_finished)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ENV_KEYS = ("DATA", "SEEDS", "CFG", "OUTPUT", "PYTHON", "DATASETS", "SOURCE", "FORCE", "DRY_RUN", "LAUNCHER",
            "JOBS", "GPUS", "TEACHER", "TEACHER_CFG", "SHOTS")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHERS = ("local", "slurm")


def usage(protocol: str) -> str:
    """How to call the script of ``protocol`` (base2new, xd or dg)."""
    trainers = " ".join(registry.TRAINERS)
    if protocol == "base2new":
        return (f"usage: DATA=/path/to/datasets scripts/base2new.sh TRAINER DATASET SHOTS [KEY VALUE ...]\n"
                f"  TRAINER: {trainers}   DATASET: {' '.join(registry.BASE2NEW_RUNNABLE)}")
    if protocol == "fewshot":
        return (f"usage: DATA=/path/to/datasets [SHOTS=\"1 2 4 8 16\"] scripts/fewshot.sh TRAINER DATASET "
                f"[KEY VALUE ...]\n  TRAINER: {trainers}   DATASET: {' '.join(registry.FEWSHOT_RUNNABLE)}")
    return f"usage: DATA=/path/to/datasets scripts/{protocol}.sh TRAINER SHOTS [KEY VALUE ...]   (TRAINER: {trainers})"


def _abspath(path: str, cwd: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(cwd, path))


def _flag(env: Dict[str, str], key: str) -> bool:
    return env.get(key, "0") not in ("", "0")


#: The variables whose values end up in paths and commands (a control character there is refused).
TEXT_KEYS = ("DATA", "OUTPUT", "PYTHON", "CFG", "SOURCE", "DATASETS", "SEEDS", "SHOTS")


def refuse_control_characters(args: Sequence[str], env: Dict[str, str]) -> None:
    """InputError when an argument or a TEXT_KEYS variable holds a control character (a newline in
    OUTPUT would, in a DRY_RUN script, start a command of its own)."""
    named = [(f"argument {i + 1}", a) for i, a in enumerate(args)] + [(k, env[k]) for k in TEXT_KEYS if k in env]
    for name, value in named:
        bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
        if bad is not None:
            raise InputError(f"{name} = {value!r} contains the control character {bad!r}: paths, names and "
                             "options must be plain text")


def settings_from(protocol: str, args: Sequence[str], env: Dict[str, str], cwd: str) -> Settings:
    """Check the arguments and environment (InputError with what to do) -> Settings."""
    registry.protocol(protocol)
    refuse_control_characters(args, env)
    need = 3 if protocol == "base2new" else 2
    if len(args) < need:
        raise InputError(usage(protocol))
    typed = args[0]
    dataset = args[1] if protocol in ("base2new", "fewshot") else None
    shots_list: List[int] = []
    if protocol == "fewshot":  # the shots come from SHOTS, never from the arguments
        shots_list = fewshot_shots(env.get("SHOTS"))
        args = [args[0], args[1], str(max(shots_list)), *args[2:]]
        need = 3
    shots_text = args[need - 1]
    extra = list(args[need:])
    try:
        trainer = registry.trainer(typed)
    except registry.RegistryError as exc:
        raise InputError(str(exc)) from None
    source, targets = None, []
    if protocol == "fewshot":
        if dataset not in registry.FEWSHOT_RUNNABLE:
            raise InputError(f"unknown dataset '{dataset}'. Valid datasets for few-shot: "
                             f"{' '.join(registry.FEWSHOT_RUNNABLE)}")
        if trainer.transductive:
            raise InputError(f"{trainer.name} distils on unlabelled images of every class (transductive): it has no "
                             "labelled few-shot training; run it with scripts/base2new.sh or xd.sh")
    elif protocol == "base2new":
        if dataset not in registry.BASE2NEW_RUNNABLE:
            raise InputError(f"unknown dataset '{dataset}'. Valid datasets for base-to-novel: "
                             f"{' '.join(registry.BASE2NEW_RUNNABLE)}")
    else:
        source = env.get("SOURCE") or registry.DEFAULT_SOURCE
        table = registry.XD_TARGETS if protocol == "xd" else registry.DG_TARGETS
        if source not in table:
            raise InputError(f"unknown dataset '{source}'. Valid datasets for SOURCE: {' '.join(table)}")
        targets = env["DATASETS"].split() if "DATASETS" in env else list(table[source])
        known = registry.dataset_names()
        for t in targets:
            if t not in known:
                raise InputError(f"unknown dataset '{t}'. Valid datasets for DATASETS: {' '.join(known)}")
    cfg = env.get("CFG") or trainer.config_for(dataset or source)
    cfg_file = trainer.config_file(cfg)
    if not os.path.isfile(os.path.join(REPO, cfg_file)):
        avail = trainer.available_configs(REPO)
        raise InputError(f"trainer config {cfg_file} does not exist. Set CFG to one of: "
                         f"{' '.join(avail) or '(none found under ' + trainer.config_dir + ')'}")
    if not re.fullmatch(r"[0-9]+", shots_text) or int(shots_text) == 0:
        raise InputError(f"SHOTS must be a positive integer (e.g. 16), got '{shots_text}'")
    seeds_text = env.get("SEEDS", "1 2 3")
    if not all(re.fullmatch(r"[0-9]+", x) for x in seeds_text.split()):
        raise InputError(f"SEEDS must be integers separated by spaces (e.g. SEEDS=\"1 2 3\"), got '{seeds_text}'")
    if not seeds_text.split():
        raise InputError("SEEDS is empty")
    if not env.get("DATA"):
        raise InputError("DATA is not set: export DATA=/path/to/datasets (the folder holding imagenet/, "
                         "caltech-101/, ...; see DATASETS.md)")
    data = _abspath(env["DATA"], cwd)
    dry = _flag(env, "DRY_RUN")
    if not os.path.isdir(data) and not dry:
        raise InputError(f"DATA={data} does not exist or is not a folder (see DATASETS.md)")
    output = _abspath(env["OUTPUT"], cwd) if env.get("OUTPUT") else "output"
    if len(extra) % 2:
        raise InputError(f"trailing options must be KEY VALUE pairs (e.g. OPTIM.MAX_EPOCH 5), got: {' '.join(extra)}")
    python = (env.get("PYTHON") or "python").split()
    teacher = None
    if env.get("TEACHER"):
        if trainer.teacher is None:
            raise InputError(f"TEACHER={env['TEACHER']}: {trainer.name} distils from no teacher (only "
                             f"{', '.join(t.cli for t in registry.TRAINERS.values() if t.teacher)} do)")
        if env["TEACHER"] != "train":
            raise InputError(f"TEACHER={env['TEACHER']!r}: expected 'train' (train the teacher in this run); to use an "
                             f"existing teacher pass {trainer.teacher[2]} PATH as a trailing KEY VALUE")
        t_trainer, t_cfg, key = trainer.teacher_for(dataset or source)
        t_cfg = env.get("TEACHER_CFG") or t_cfg
        if not os.path.isfile(os.path.join(REPO, registry.trainer(t_trainer).config_file(t_cfg))):
            raise InputError(f"TEACHER_CFG={t_cfg}: {registry.trainer(t_trainer).config_file(t_cfg)} does not exist")
        teacher = [t_trainer, t_cfg, key]
    return Settings(protocol=protocol, trainer=trainer.name, trains=trainer.trains, cfg=cfg, cfg_file=cfg_file,
                    shots=int(shots_text), seeds=[int(x) for x in seeds_text.split()], data=data,
                    output=output, python=python, extra=extra, repo=REPO,
                    ts=time.strftime("%Y%m%d-%H%M%S"), dataset=dataset, source=source, targets=targets,
                    force=_flag(env, "FORCE"), dry_run=dry, typed_trainer=typed,
                    transductive=trainer.transductive, teacher=teacher, shots_list=shots_list)


def fewshot_shots(text: Optional[str]) -> List[int]:
    """SHOTS of the few-shot protocol (default registry.FEWSHOT_SHOTS): positive integers, no repeats."""
    if text is None or not text.strip():
        return list(registry.FEWSHOT_SHOTS)
    words = text.replace(",", " ").split()
    if not all(re.fullmatch(r"[0-9]+", w) and int(w) > 0 for w in words):
        raise InputError(f"SHOTS must be positive integers separated by spaces (e.g. SHOTS=\"1 2 4 8 16\"), got '{text}'")
    return list(dict.fromkeys(int(w) for w in words))


def protocol_datasets(s: Settings) -> List[str]:
    names = [s.dataset] if s.protocol in ("base2new", "fewshot") else ([s.source] if s.protocol == "xd" else []) + s.targets
    return list(dict.fromkeys(names))


def missing_configs(s: Settings) -> List[str]:
    return [f"dataset config {registry.dataset(n).config} does not exist (the dataset '{n}' has no config in "
            "this checkout)" for n in protocol_datasets(s)
            if not os.path.isfile(os.path.join(s.repo, registry.dataset(n).config))]


def missing_data(s: Settings) -> List[str]:
    """One line per dataset whose folder is not under $DATA (generated ones never are missing)."""
    out = []
    for name in protocol_datasets(s):
        ds = registry.dataset(name)
        if ds.generated or ds.folder is None:
            continue
        if not os.path.isdir(os.path.join(s.data, ds.folder)):
            out.append((name, f"dataset '{name}' not found: expected folder {s.data}/{ds.folder} (see {ds.doc})"))
    return out


class ProtocolRun:
    """The console of one protocol run: its messages, header, DRY_RUN script and results table."""

    def __init__(self, s: Settings):
        self.s = s
        self.prefix = f"[{s.protocol}]"

    def say(self, msg: str) -> None:
        if self.s.dry_run:  # the printed script: every line of a message stays a comment
            msg = "\n".join(f"# {line}" for line in (msg.splitlines() or [""]))
            print(msg, flush=True)
        else:
            print(f"{self.prefix} {msg}", flush=True)

    def header(self) -> None:
        s = self.s
        what = {"base2new": f"base2new on {s.dataset}",
                "xd": f"cross-dataset: {s.source} -> {' '.join(s.targets)}",
                "dg": f"domain generalisation: {s.source} -> {' '.join(s.targets)}",
                "fewshot": f"few-shot on {s.dataset} (all classes)"}[s.protocol]
        shots = " ".join(map(str, s.shots_list)) if s.protocol == "fewshot" and s.trains else str(s.shots)
        if s.protocol == "fewshot" and not s.trains:
            shots = "none (zero-shot: one evaluation)"
        self.say(f"{what} | trainer {s.trainer} | cfg {s.cfg} | shots {shots} | seeds {' '.join(map(str, s.seeds))}")
        self.say(f"DATA={s.data} OUTPUT={s.output} PYTHON={' '.join(s.python)}"
                 + (f" | extra: {' '.join(s.extra)}" if s.extra else ""))
        if s.dry_run:
            print(f"cd {quote([s.repo])}")

    # --- dg: the models come from xd ----------------------------------------------------------
    def check_trained(self, jobs: List[Job], queued: Optional[Dict[str, str]] = None) -> tuple:
        """dg: drop the seeds whose source model is not trained (a failure, or a comment in DRY_RUN).

        ``queued``: source folders whose training is queued or running as a SLURM job (folder -> id);
        those seeds are kept, and their evaluations will wait for that job."""
        s, failures = self.s, []
        missing = set()
        for seed in s.seeds:
            src = source_dir(s, seed)
            if not s.trains or train_finished(src):
                continue
            if queued and src in queued:
                self.say(f"seed {seed}: {s.source} training {src} is queued as SLURM job {queued[src]}; "
                         "its evaluations will start after it")
                continue
            train_cmd = quote([*s.python, "train.py", *train_args(s, seed, s.source, src), "DATASET.NUM_SHOTS",
                               str(s.shots), *s.extra])
            msg = (f"no finished {s.source} checkpoint in {src}: run scripts/xd.sh {s.typed_trainer} {s.shots} "
                   f"first (with DATASETS= it only trains), or train it: {train_cmd}")
            if s.dry_run:
                self.say(msg)
            else:
                print(f"error: {msg}", file=sys.stderr)
                failures.append(f"seed{seed}: {msg}")
                missing.add(seed)
        keep = [j for j in jobs if j.seed not in missing]
        return keep, failures

    # --- DRY_RUN ---------------------------------------------------------------------------------
    def dry_run(self, jobs: List[Job]) -> None:
        s = self.s
        moved, stopped, assumed = set(), {}, set()
        for job in jobs:
            st = inspect(job, s)
            bad = [d for d in job.deps if d in stopped]
            if bad:
                stopped[job.dir] = "not run"
                self.say(f"seed {job.seed}: its {job.what} is not run ({bad[0]} {stopped[bad[0]]})")
                continue
            if st.name in ("running", "mismatch") and not (s.force and st.name == "mismatch"):
                stopped[job.dir] = "is running elsewhere" if st.name == "running" else "was refused"
            if s.force and os.path.exists(job.dir) and st.name != "running":
                move_aside(s, job.dir, self.say, "FORCE=1")
                moved.add(job.dir)
            elif st.name == "finished":
                self.say(f"skip (finished): {job.dir}")
                continue
            elif st.name == "mismatch":
                self.say(f"refused: {job.name}: {st.note}")
                continue
            elif st.name == "running":
                self.say(st.note)
                continue
            elif st.name == "stale":
                self.say(f"stale: {st.note}; re-evaluating")
                move_aside(s, job.dir, self.say, "stale evaluation")
            elif st.name in ("resume", "rerun"):
                self.say(f"{'resume' if st.name == 'resume' else 're-run'}: {st.note}")
            load: List[str] = []
            if job.model_dir:
                load, _ = model_args(job.model_dir) if job.model_dir not in moved else ([], None)
                if not load:
                    ep = config_max_epoch(s)
                    if job.model_dir not in assumed:
                        assumed.add(job.model_dir)
                        self.say(f"{job.model_dir} has no checkpoint yet: --load-epoch {ep or '?'} assumed from "
                                 "OPTIM.MAX_EPOCH (a real run reads it from the checkpoint)")
                    load = ["--model-dir", job.model_dir, "--load-epoch", ep or "EPOCH"]
            print(quote([*s.python, "train.py", *job.head, *load, *job.tail]), flush=True)

    # --- the table -------------------------------------------------------------------------------
    def table_args(self) -> List[str]:
        s = self.s
        seeds = ",".join(map(str, s.seeds))
        if s.protocol == "base2new":
            return ["base2new", "--root", s.output, "--trainers", s.trainer, "--configs", s.cfg, "--datasets",
                    s.dataset, "--shots", str(s.shots), "--seeds", seeds]
        if s.protocol == "fewshot":  # a zero-shot model: one evaluation, with the first seed
            return ["fewshot", "--root", s.output, "--trainers", s.trainer, "--configs", s.cfg, "--datasets",
                    s.dataset, "--seeds", seeds if s.trains else str(s.seeds[0])]
        return [s.protocol, "--root", s.output, "--trainers", s.trainer, "--configs", s.cfg, "--shots",
                str(s.shots), "--seeds", seeds, "--datasets", ",".join(s.targets)]

    def table(self, jobs: List[Job]) -> None:
        s = self.s
        cmd = [*s.python, "-m", "spotlighter.results", *self.table_args()]
        if s.dry_run:
            print(quote(cmd))
            return
        print(flush=True)
        try:
            r = subprocess.run(cmd, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
            ok, err = r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]
        except OSError as exc:
            ok, err = False, str(exc)
        if not ok:
            print(f"(results table unavailable: '{quote(cmd)}' failed: {err}); plain summary:")
            print(plain_summary(s, jobs), flush=True)


def accuracy_of(d: str) -> Optional[float]:
    """result.json's accuracy, else the last ``* accuracy:`` of the newest log; None if neither."""
    try:
        with open(os.path.join(d, "result.json")) as f:
            return float(json.load(f)["accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log = newest_log(d)
    if log:
        try:
            with open(log, errors="replace") as f:
                found = re.findall(r"\* accuracy: ([0-9.]+)", f.read())
            if found:
                return float(found[-1])
        except OSError:
            pass
    return None


def _mean(values: List[Optional[float]]) -> Optional[float]:
    return summarize([v for v in values if v is not None]).mean


def _f(v: Optional[float]) -> str:
    return "NA" if v is None else f"{v:.2f}"


def plain_summary(s: Settings, jobs: List[Job]) -> str:
    """Per-seed accuracies and means (results.stats) when the results tool cannot run."""
    lines = []
    if s.protocol == "base2new":
        lines.append(f"{'seed':<8} {'Base':>8} {'New':>8}")
        bs, ns = [], []
        for seed in s.seeds:
            b, n = accuracy_of(base2new_job_dir(s, ROLE_BASE, seed)), accuracy_of(base2new_job_dir(s, ROLE_NEW, seed))
            bs.append(b)
            ns.append(n)
            lines.append(f"{'seed' + str(seed):<8} {_f(b):>8} {_f(n):>8}")
        b, n = _mean(bs), _mean(ns)
        hm = harmonic_mean(b, n) if b is not None and n is not None else None
        lines.append(f"{s.dataset}: {s.trainer} {s.shots} shots  Base {_f(b)}  New {_f(n)}  HM {_f(hm)}")
        return "\n".join(lines)
    if s.protocol == "fewshot":
        for job in jobs:
            lines.append(f"{job.dir}: {_f(accuracy_of(job.dir))}")
        return "\n".join(lines)
    rows = ([s.source] if s.protocol == "xd" else []) + s.targets
    for d in rows:
        accs = []
        for seed in s.seeds:
            if d == s.source and s.protocol == "xd":
                accs.append(accuracy_of(source_dir(s, seed)))
            else:
                accs.append(accuracy_of(f"{eval_root(s)}/{d}/seed{seed}"))
        lines.append(f"{d:<16} {_f(_mean(accs)):>8}   (per seed: {' '.join(_f(a) for a in accs)})")
    return "\n".join(lines)


def check_writable(s: Settings) -> Optional[str]:
    """One line saying why OUTPUT cannot be written, or None."""
    out = s.output if os.path.isabs(s.output) else os.path.join(s.repo, s.output)
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        return f"cannot write to OUTPUT={out}: {exc.strerror or exc} (choose another OUTPUT or free space)"
    return None


def report(runner: ProtocolRun, outcomes: Dict[str, Outcome], extra_failures: List[str],
           headline: Optional[str] = None) -> int:
    failed = [o.message for o in outcomes.values() if o.status == "failed"] + extra_failures
    refused = [o.message for o in outcomes.values() if o.status == "refused"]
    changed = [o.message for o in outcomes.values() if o.status == "changed"]
    stopped = [o.message for o in outcomes.values() if o.status == "stopped"]
    running = [o.message for o in outcomes.values() if o.status == "running"]
    blocked = [o.message for o in outcomes.values() if o.status == "blocked"]
    nrun = sum(1 for o in outcomes.values() if o.ran)
    nskip = sum(1 for o in outcomes.values() if o.status == "skipped")
    print(flush=True)
    more = "".join(f", {len(x)} {w}" for x, w in ((refused + changed, "refused"), (stopped, "stopped"),
                                                  (running, "running elsewhere"), (blocked, "not run")) if x)
    runner.say(f"{headline or f'done: {nrun} job(s) run'}, {nskip} skipped as finished, {len(failed)} failed{more}")
    for title, items in (("FAILED jobs:", failed),
                         ("REFUSED jobs (finished with other trailing options):", refused),
                         ("REFUSED resumes (an interrupted run with other trailing options):", changed),
                         ("STOPPED by a signal (a resumable checkpoint is written; re-run the same command to "
                          "resume):", stopped),
                         ("RUNNING elsewhere (not started twice; re-run when they have finished):", running),
                         ("NOT RUN (a job they depend on did not finish):", blocked)):
        if items:
            print(title, file=sys.stderr)
            for m in items:
                print(f"  {m}", file=sys.stderr)
    sys.stderr.flush()
    return EXIT_FAILED if failed or refused or changed or stopped or running or blocked else EXIT_OK


def launcher_of(env: Dict[str, str]) -> str:
    launcher = env.get("LAUNCHER", "local") or "local"
    if launcher not in LAUNCHERS:
        raise InputError(f"LAUNCHER must be one of {', '.join(LAUNCHERS)}, got '{launcher}'")
    return launcher


def slots_of(env: Dict[str, str]) -> tuple:
    """(jobs at a time, GPU list) from JOBS and GPUS."""
    gpus = env.get("GPUS", "").split()
    jobs_text = env.get("JOBS", "")
    if jobs_text and (not jobs_text.isdigit() or int(jobs_text) < 1):
        raise InputError(f"JOBS must be a positive integer, got '{jobs_text}'")
    return (int(jobs_text) if jobs_text else (len(gpus) or 1)), gpus


#: The thread-count variables torch's CPU kernels read when they are loaded.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def share_cores(env: Dict[str, str], slots: int, say) -> Optional[int]:
    """With ``slots`` > 1 local jobs and no thread count set: give each job cores // slots threads.

    Sets THREAD_VARS in this process's environment (and ``env``), which the fork server and every
    job's interpreter inherit, so N jobs do not each start one thread per core. Returns the count,
    or None when nothing was set (one slot, or the user chose a thread count)."""
    if slots <= 1 or any(env.get(v) for v in THREAD_VARS):
        return None
    cores = machine.cores()
    n = max(1, cores // slots)
    for v in THREAD_VARS:
        os.environ[v] = env[v] = str(n)
    say(f"JOBS={slots} on {cores} cores: {n} thread(s) per job (OMP_NUM_THREADS={n}; set it to choose)")
    return n


def job_starter(s: Settings, env: Dict[str, str], say) -> Optional[object]:
    """The fork-server launcher (spotlighter.run.fast) when it can be used, else None (subprocesses)."""
    from . import fast
    reason = fast.why_not(s.python, env)
    if reason:
        say(f"each job starts a fresh interpreter ({reason})")
        return None
    launcher = fast.ForkLauncher(s.python, s.repo)
    launcher.warm_up()
    say(f"jobs start from a fork server that imported torch and Dassl once ({fast.ENV_SWITCH}=0: a fresh "
        "interpreter each)")
    return launcher


def force_aside(jobs: Sequence[Job], settings_of, say) -> Dict[str, Outcome]:
    """FORCE=1: move every job's old folder aside (a folder locked by a live process stays: running)."""
    outcomes: Dict[str, Outcome] = {}
    for job in jobs:
        if os.path.exists(job.dir):
            s = settings_of(job)
            st = inspect(job, s)
            if st.name == "running":
                outcomes[job.dir] = Outcome("running", st.note)
                continue
            try:
                move_aside(s, job.dir, say, "FORCE=1")
            except OSError as exc:
                raise InputError(f"FORCE=1 cannot move {job.dir} aside: {exc.strerror or exc}") from None
    return outcomes


