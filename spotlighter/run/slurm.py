"""The SLURM launcher (``LAUNCHER=slurm``) and ``python -m spotlighter.run status``.

Every job that is not finished is submitted with ``sbatch``; an evaluation depends on its training
job (``--dependency=afterok:<id>``), and the end-of-protocol table is a last job depending on all of
them (``afterany``: it is printed also when some job failed, with the missing seeds marked). SLURM
does all the scheduling. Each SLURM job runs ``python -m spotlighter.run job <spec>.json``, which
makes the same decisions as a local run when it starts (skip finished, resume, redo a stale
evaluation; a folder locked by a live process is never run twice).

sbatch options, from a small config file (``SLURM_CONFIG=path``; lines ``key = value``, ``#``
comments) and/or the environment, the environment winning:

  key            environment          sbatch option
  partition      SLURM_PARTITION      --partition
  account        SLURM_ACCOUNT        --account
  time           SLURM_TIME           --time            (per job, e.g. 04:00:00)
  gpus_per_job   SLURM_GPUS_PER_JOB   --gres=gpu:N      (training and evaluation jobs, not the table)
  cpus_per_job   SLURM_CPUS_PER_JOB   --cpus-per-task
  mem_per_job    SLURM_MEM_PER_JOB    --mem
  signal_margin  SLURM_SIGNAL_MARGIN  --signal=B:USR1@N (default 300 s; 0: none)
  requeue        SLURM_REQUEUE        --requeue (default yes) | --no-requeue (no)
  extra          SLURM_EXTRA          any other options, e.g. "--qos=normal --constraint=a100"

Preemption and time limits: ``signal_margin`` seconds before its time limit SLURM sends the job
SIGUSR1; the job passes it on to ``train.py``, which finishes its current step, writes a resumable
checkpoint and exits 75, and the job requeues itself (``scontrol requeue``): it starts again, resumes
from that checkpoint, and its evaluation and the table (which depend on it) wait for it. A job
preempted by SLURM (SIGTERM) checkpoints the same way and is requeued by SLURM (``--requeue``). The
jobs' logs are opened with ``--open-mode=append``, so a requeued job's log keeps its first part.
``LAUNCHER=slurm DRY_RUN=1`` prints the submission as a script (the spec and batch files as
here-documents, the sbatch commands with their dependencies) and submits nothing.

Submitted jobs are recorded in ``$OUTPUT/slurm/jobs.jsonl`` (folder -> job id), their batch scripts
and SLURM logs in ``$OUTPUT/slurm/<time>/``. A job still queued or running from an earlier submission
is reused as a dependency, never submitted twice.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from .. import preempt
from .jobs import EVAL, TRAIN, InputError, Job, Outcome, Settings, State, elapsed_of, inspect, quote
from .local import fmt_seconds
from .protocol import report

OPTIONS = {  # key -> (environment variable, sbatch option format)
    "partition": ("SLURM_PARTITION", "--partition={}"),
    "account": ("SLURM_ACCOUNT", "--account={}"),
    "time": ("SLURM_TIME", "--time={}"),
    "gpus_per_job": ("SLURM_GPUS_PER_JOB", "--gres=gpu:{}"),
    "cpus_per_job": ("SLURM_CPUS_PER_JOB", "--cpus-per-task={}"),
    "mem_per_job": ("SLURM_MEM_PER_JOB", "--mem={}"),
    "signal_margin": ("SLURM_SIGNAL_MARGIN", "--signal=B:" + preempt.REQUEUE_SIGNAL.name[3:] + "@{}"),
    "requeue": ("SLURM_REQUEUE", "{}"),
    "extra": ("SLURM_EXTRA", None),
}
#: Defaults of the options above (the others have none): the stop signal comes 5 minutes before the
#: time limit (a training step and a checkpoint take seconds), and a stopped job is requeued.
DEFAULTS = {"signal_margin": "300", "requeue": "yes"}
#: Options the table job does not get (it needs no GPU, trains nothing).
COMPUTE_ONLY = ("gpus_per_job", "signal_margin", "requeue")
#: Options every training/evaluation job gets: a requeued job appends to its log.
COMPUTE_ALWAYS = ("--open-mode=append",)
YES, NO = ("yes", "1", "true", "on"), ("no", "0", "false", "off")
LEDGER = "jobs.jsonl"
SLURM_DIR = "slurm"
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING")
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                 "DEADLINE")


def read_config(path: str) -> Dict[str, str]:
    cfg: Dict[str, str] = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise InputError(f"SLURM_CONFIG={path} cannot be read: {exc.strerror or exc}") from None
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        sep = "=" if "=" in line else ":" if ":" in line else None
        key, value = (x.strip() for x in line.split(sep, 1)) if sep else (line, "")
        if key not in OPTIONS or not sep:
            raise InputError(f"{path}, line {n}: expected 'key = value' with key one of "
                             f"{', '.join(OPTIONS)}; got {raw.strip()!r}")
        cfg[key] = value
    return cfg


def _checked(key: str, value: str, env_name: str) -> str:
    """The sbatch value of ``signal_margin`` / ``requeue`` ("" for none)."""
    if key == "signal_margin":
        if not value.isdigit():
            raise InputError(f"{env_name} must be a number of seconds (e.g. 300; 0 for no signal), got '{value}'")
        return "" if int(value) == 0 else value
    if key == "requeue":
        if value.lower() not in YES + NO:
            raise InputError(f"{env_name} must be yes or no, got '{value}'")
        return "--requeue" if value.lower() in YES else "--no-requeue"
    return value


def sbatch_options(env: Dict[str, str]) -> tuple:
    """(options of training/evaluation jobs, options of the table job)."""
    cfg = dict(DEFAULTS)
    source = {k: f"SLURM_CONFIG {k}" for k in cfg}
    if env.get("SLURM_CONFIG"):
        read = read_config(env["SLURM_CONFIG"])
        cfg.update(read)
        source.update({k: f"{env['SLURM_CONFIG']}: {k}" for k in read})
    for key, (var, _fmt) in OPTIONS.items():
        if env.get(var):
            cfg[key], source[key] = env[var], var
    compute: List[str] = list(COMPUTE_ALWAYS)
    table: List[str] = []
    for key, value in cfg.items():
        value = _checked(key, value, source.get(key, key))
        if not value:
            continue
        fmt = OPTIONS[key][1]
        opts = shlex.split(value) if fmt is None else [fmt.format(value)]
        compute += opts
        if key not in COMPUTE_ONLY:
            table += opts
    return compute, table


def _out_abs(s: Settings) -> str:
    return s.output if os.path.isabs(s.output) else os.path.join(s.repo, s.output)


def read_ledger(s: Settings) -> Dict[str, dict]:
    """Folder -> its latest submission."""
    path = os.path.join(_out_abs(s), SLURM_DIR, LEDGER)
    out: Dict[str, dict] = {}
    try:
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    out[entry["dir"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue
    except OSError:
        pass
    return out


def squeue_states(ids: Sequence[str], env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    if not ids or shutil.which("squeue") is None:
        return {}
    r = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)], capture_output=True, text=True,
                       env=env)
    states = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


#: The states a job ends in (sacct / scontrol names).
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                          "PREEMPTED", "BOOT_FAIL", "DEADLINE"})


def finished_states(ids: Sequence[str]) -> Dict[str, str]:
    """Final states from sacct (accounting), else from scontrol (jobs the controller still remembers).

    The controller reports to accounting asynchronously: for a job that has just ended, sacct can
    still say RUNNING or PENDING. Such a state is only kept when the controller no longer knows the job."""
    if not ids:
        return {}
    states: Dict[str, str] = {}
    stale: Dict[str, str] = {}
    if shutil.which("sacct"):
        r = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            for line in r.stdout.splitlines():
                parts = line.split("|")
                if len(parts) == 2:
                    state = parts[1].split()[0] if parts[1].split() else ""
                    (states if state in FINAL_STATES else stale)[parts[0]] = state
    if shutil.which("scontrol"):
        for i in ids:
            if i in states:
                continue
            r = subprocess.run(["scontrol", "-o", "show", "job", i], capture_output=True, text=True)
            for word in r.stdout.split():
                if word.startswith("JobState="):
                    states[i] = word.split("=", 1)[1]
    for i, state in stale.items():
        states.setdefault(i, state)
    return states


def _batch_script(s: Settings, spec: str, what: str) -> str:
    return "\n".join([
        "#!/bin/bash",
        f"# spotlighter.run: {what}",
        f"cd {shlex.quote(s.repo)}",
        f"export PYTHONPATH={shlex.quote(s.repo)}${{PYTHONPATH:+:$PYTHONPATH}}",
        f"exec {shlex.quote(sys.executable)} -m spotlighter.run job {shlex.quote(spec)}",
        ""])


def queued_trainings(s: Settings, dirs: Sequence[str]) -> Dict[str, str]:
    """Folder -> SLURM job id, for the folders of ``dirs`` whose latest submission (this OUTPUT's
    ledger) is still pending or running: dg.sh submitted right after xd.sh chains onto xd's training."""
    ledger = read_ledger(s)
    entries = {d: ledger[d]["id"] for d in dirs if d in ledger}
    live = squeue_states(list(entries.values()))
    return {d: jid for d, jid in entries.items() if live.get(jid) in ACTIVE}


def requeue_self(out: Outcome, say) -> None:
    """After ``train.py`` stopped with a resumable checkpoint (a SLURM job's ``spotlighter.run job``):
    requeue this SLURM job when the stop signal was the time-limit warning (``--signal``)."""
    sig = preempt.signal_name(out.stop_signal) if out.stop_signal is not None else "a signal"
    jid = os.environ.get("SLURM_JOB_ID")
    if out.stop_signal != preempt.REQUEUE_SIGNAL:
        say(f"not requeued: stopped by {sig} (preemption, scancel or the time limit: a job submitted with "
            "--requeue is requeued by SLURM when it is preempted); re-submitting resumes it")
        return
    if not jid:
        say("not under SLURM (no SLURM_JOB_ID): re-run the same command to resume")
        return
    say(f"requeueing SLURM job {jid} (scontrol requeue): it resumes from the checkpoint when it runs again")
    sys.stdout.flush()
    r = subprocess.run(["scontrol", "requeue", jid], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"error: scontrol requeue {jid} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}; submit "
              "the same command again to resume", file=sys.stderr)


class _Plan:
    """Writes the job files and runs sbatch, or (DRY_RUN) prints both as a shell script."""

    def __init__(self, dry: bool):
        self.dry = dry

    def mkdir(self, path: str) -> None:
        if self.dry:
            print(quote(["mkdir", "-p", path]))
        else:
            os.makedirs(path, exist_ok=True)

    def write(self, path: str, text: str) -> None:
        if self.dry:
            end = "SPOTLIGHTER_EOF"
            print(f"cat > {shlex.quote(path)} <<'{end}'\n{text}{'' if text.endswith(chr(10)) else chr(10)}{end}")
        else:
            with open(path, "w") as f:
                f.write(text)

    def sbatch(self, cmd: List[str], var: str):
        """(job id or "$var" in a dry run, error line or None)."""
        if self.dry:  # the ids of earlier jobs are shell variables: "$J000" expands, the rest is quoted
            argv = " ".join(f'"{a}"' if re.fullmatch(r"--dependency=\w+(:\$\w+)+", a) else shlex.quote(a) for a in cmd)
            print(f"{var}=$({argv}) && {var}=${{{var}%%;*}} || exit 1")
            return f"${var}", None
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return None, (r.stderr.strip().splitlines() or ["?"])[-1]
        return r.stdout.strip().split(";")[0], None


def submit(runner, jobs: List[Job], env: Dict[str, str], failures: List[str],
           outcomes: Optional[Dict[str, Outcome]] = None, queued: Optional[Dict[str, str]] = None,
           moved: Sequence[str] = ()) -> int:
    """Submit ``jobs``; ``queued``: model folders trained by SLURM jobs submitted earlier (dg after
    xd), whose evaluations depend on those jobs. With DRY_RUN print the submission instead
    (``moved``: folders FORCE=1 moves aside first, taken as absent)."""
    s: Settings = runner.s
    plan = _Plan(s.dry_run)
    if shutil.which("sbatch") is None and not s.dry_run:
        raise InputError("LAUNCHER=slurm needs sbatch on PATH (run on a SLURM login node), or use LAUNCHER=local")
    compute_opts, table_opts = sbatch_options(env)
    outcomes = dict(outcomes or {})
    ledger = read_ledger(s)
    live = squeue_states([e["id"] for e in ledger.values()])
    subdir = os.path.join(_out_abs(s), SLURM_DIR, s.ts)
    try:
        plan.mkdir(subdir)
        ledger_file = open(os.devnull if s.dry_run else os.path.join(_out_abs(s), SLURM_DIR, LEDGER), "a")
    except OSError as exc:
        print(f"error: cannot write {subdir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    ids: Dict[str, str] = {}
    submitted = 0
    with ledger_file:
        for n, job in enumerate(jobs):
            if job.dir in outcomes:
                continue
            bad = [d for d in job.deps if d in outcomes and outcomes[d].status not in ("done", "skipped", "submitted")]
            if bad:
                outcomes[job.dir] = Outcome("blocked", f"{job.name}: not run: {bad[0]} is "
                                                       f"{outcomes[bad[0]].status}")
                runner.say(f"seed {job.seed}: {job.what} not submitted: {bad[0]} is {outcomes[bad[0]].status}")
                continue
            dep_ids = [ids[d] for d in job.deps if d in ids]
            if queued and job.model_dir in queued:
                dep_ids.append(queued[job.model_dir])
            st = State("absent") if job.dir in moved else inspect(job, s)
            if st.name == "running":
                outcomes[job.dir] = Outcome("running", st.note)
                runner.say(st.note)
                continue
            if st.name in ("mismatch", "changed"):
                outcomes[job.dir] = Outcome("refused" if st.name == "mismatch" else "changed", f"{job.name}: {st.note}")
                if s.dry_run:
                    runner.say(f"refused: {job.name}: {st.note}")
                continue
            if st.name == "finished" and not dep_ids:
                outcomes[job.dir] = Outcome("skipped")
                runner.say(f"skip (finished): {job.dir}")
                continue
            prev = ledger.get(job.dir)
            if prev and live.get(prev["id"]) in ACTIVE:
                ids[job.dir] = prev["id"]
                outcomes[job.dir] = Outcome("submitted")
                runner.say(f"already {live[prev['id']].lower()} as SLURM job {prev['id']}: {job.dir}")
                continue
            stem = os.path.join(subdir, f"{n:03d}-{job.kind}-{job.dataset}-seed{job.seed}")
            if s.dry_run:
                print(f"\n# {job.name}")
            plan.write(stem + ".json", json.dumps({"settings": {**s.__dict__, "dry_run": False},
                                                   "job": job.__dict__}, indent=None if s.dry_run else 1) + "\n")
            plan.write(stem + ".sh", _batch_script(s, stem + ".json", job.name))
            cmd = ["sbatch", "--parsable", f"--job-name=spl-{job.kind}-{job.dataset}-s{job.seed}",
                   f"--output={stem}-%j.out", f"--chdir={s.repo}", *compute_opts]
            if dep_ids:  # and cancelled when its training fails, so the table job (afterany) still runs
                cmd += [f"--dependency=afterok:{':'.join(dep_ids)}", "--kill-on-invalid-dep=yes"]
            cmd.append(stem + ".sh")
            jid, err = plan.sbatch(cmd, f"J{n:03d}")
            if err is not None:
                outcomes[job.dir] = Outcome("failed", f"{job.name}: sbatch failed: {err} ({quote(cmd)})")
                continue
            ids[job.dir] = jid
            submitted += 1
            outcomes[job.dir] = Outcome("submitted")
            ledger_file.write(json.dumps({"dir": job.dir, "id": jid, "kind": job.kind, "ts": s.ts,
                                          "log": f"{stem}-{jid}.out"}) + "\n")
            ledger_file.flush()
            if not s.dry_run:
                runner.say(f"submitted {job.name} as SLURM job {jid}"
                           + (f" (after {', '.join(dep_ids)})" if dep_ids else ""))
    table_note = ""
    if ids:
        table_cmd = quote([*s.python, "-m", "spotlighter.results", *runner.table_args()])
        script = os.path.join(subdir, "table.sh")
        if s.dry_run:
            print("\n# the end-of-protocol table, after every job above")
        plan.write(script, "\n".join(["#!/bin/bash", "# spotlighter.run: the end-of-protocol table",
                                      f"cd {shlex.quote(s.repo)}",
                                      f"export PYTHONPATH={shlex.quote(s.repo)}${{PYTHONPATH:+:$PYTHONPATH}}",
                                      table_cmd, ""]))
        cmd = ["sbatch", "--parsable", "--job-name=spl-table", f"--output={subdir}/table-%j.out",
               f"--chdir={s.repo}", *table_opts, f"--dependency=afterany:{':'.join(ids.values())}", script]
        jid, err = plan.sbatch(cmd, "TABLE")
        if err is None and not s.dry_run:
            table_note = f"{subdir}/table-{jid}.out"
            runner.say(f"submitted the table as SLURM job {jid} -> {table_note}")
        elif err is not None:
            failures.append(f"table: sbatch failed: {err}")
    else:
        runner.table(jobs)
    if s.dry_run:
        return 0
    reused = sum(1 for o in outcomes.values() if o.status == "submitted") - submitted
    code = report(runner, {d: o for d, o in outcomes.items() if o.status != "submitted"}, failures,
                  headline=f"submitted: {submitted} job(s)" + (f", {reused} already queued" if reused else ""))
    shots = [] if s.protocol == "fewshot" else [str(s.shots)]  # fewshot: SHOTS in the environment
    args = [s.protocol, s.typed_trainer, *([s.dataset] if s.dataset else []), *shots, *s.extra]
    runner.say(f"where they stand: {quote(['python', '-m', 'spotlighter.run', 'status', *args])} "
               "(with the same SEEDS/SHOTS/CFG/OUTPUT/DATASETS/SOURCE)")
    return code


def status(s: Settings, jobs: List[Job]) -> int:
    """What is done, running, queued, failed or not started: the output tree, then squeue / sacct."""
    ledger = read_ledger(s)
    ids = [ledger[j.dir]["id"] for j in jobs if j.dir in ledger]
    queued = squeue_states(ids)
    final = finished_states([i for i in ids if i not in queued])
    counts: Dict[str, int] = {}
    states: Dict[str, str] = {}
    rows = []
    remaining: List[Job] = []
    for job in jobs:
        st = inspect(job, s)
        entry = ledger.get(job.dir)
        jid = entry["id"] if entry else "-"
        sstate = queued.get(jid) or final.get(jid) or ""
        note = ""
        if st.name == "finished":
            state = "done"
        elif st.name == "stale":
            state, note = "stale", st.note
        elif st.name == "mismatch":
            state, note = "refused", st.note
        elif st.name == "running" or sstate in ("RUNNING", "COMPLETING", "CONFIGURING"):
            state, note = "running", st.note if st.name == "running" else ""
        elif sstate in ACTIVE:
            state = "queued"
        elif any(states.get(d) in ("failed", "not run", "refused") for d in job.deps):
            state, note = "not run", f"{job.deps[0]} did not finish"
        elif sstate in FAILED_STATES or sstate == "COMPLETED" or st.name in ("resume", "rerun"):
            state = "failed"
            logs = sorted(p for p in os.listdir(job.dir) if p.startswith("run-")) if os.path.isdir(job.dir) else []
            where = entry["log"] if entry and os.path.exists(entry.get("log", "")) else (
                os.path.join(job.dir, logs[-1]) if logs else "")
            note = (f"SLURM {sstate}; " if sstate else "interrupted or failed; ") + (f"see {where}" if where else "")
        else:
            state = "not started"
        if state not in ("done", "failed", "not run", "refused"):
            remaining.append(job)
        counts[state] = counts.get(state, 0) + 1
        states[job.dir] = state
        rows.append((state, jid, job.name, note))
    width = max(len(r[0]) for r in rows) if rows else 8
    for state, jid, name, note in rows:
        print(f"{state:<{width}}  {jid:>8}  {name}{'   ' + note if note else ''}")
    done = counts.get("done", 0)
    parts = [f"{counts[k]} {k}" for k in ("running", "queued", "failed", "not run", "refused", "stale", "not started")
             if counts.get(k)]
    means = {}
    for kind in (TRAIN, EVAL):
        secs = [e for j in jobs if j.kind == kind and (e := elapsed_of(j.dir)) is not None]
        if secs:
            means[kind] = sum(secs) / len(secs)
    eta = ""
    todo = [j for j in remaining]
    if todo and all(j.kind in means for j in todo):
        work = sum(means[j.kind] for j in todo)
        par = max(counts.get("running", 0), 1)
        eta = f"; ETA {fmt_seconds(work / par)} at {par} job(s) at a time (from the finished jobs' run times)"
    elif todo:
        eta = "; ETA once a job of each kind has finished"
    print(f"\n{done}/{len(jobs)} done" + (", " + ", ".join(parts) if parts else "") + eta)
    return 0 if done == len(jobs) else 1
