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
  extra          SLURM_EXTRA          any other options, e.g. "--qos=normal --constraint=a100"

Submitted jobs are recorded in ``$OUTPUT/slurm/jobs.jsonl`` (folder -> job id), their batch scripts
and SLURM logs in ``$OUTPUT/slurm/<time>/``. A job still queued or running from an earlier submission
is reused as a dependency, never submitted twice.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from .jobs import EVAL, TRAIN, InputError, Job, Outcome, Settings, elapsed_of, inspect, quote
from .local import fmt_seconds

OPTIONS = {  # key -> (environment variable, sbatch option format)
    "partition": ("SLURM_PARTITION", "--partition={}"),
    "account": ("SLURM_ACCOUNT", "--account={}"),
    "time": ("SLURM_TIME", "--time={}"),
    "gpus_per_job": ("SLURM_GPUS_PER_JOB", "--gres=gpu:{}"),
    "cpus_per_job": ("SLURM_CPUS_PER_JOB", "--cpus-per-task={}"),
    "mem_per_job": ("SLURM_MEM_PER_JOB", "--mem={}"),
    "extra": ("SLURM_EXTRA", None),
}
#: Options the table job does not get (it needs no GPU).
COMPUTE_ONLY = ("gpus_per_job",)
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


def sbatch_options(env: Dict[str, str]) -> tuple:
    """(options of training/evaluation jobs, options of the table job)."""
    cfg = read_config(env["SLURM_CONFIG"]) if env.get("SLURM_CONFIG") else {}
    for key, (var, _fmt) in OPTIONS.items():
        if env.get(var):
            cfg[key] = env[var]
    compute: List[str] = []
    table: List[str] = []
    for key, value in cfg.items():
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


def submit(runner, jobs: List[Job], env: Dict[str, str], failures: List[str],
           outcomes: Optional[Dict[str, Outcome]] = None, queued: Optional[Dict[str, str]] = None) -> int:
    """Submit ``jobs``; ``queued``: model folders trained by SLURM jobs submitted earlier (dg after
    xd), whose evaluations depend on those jobs."""
    s: Settings = runner.s
    if shutil.which("sbatch") is None:
        raise InputError("LAUNCHER=slurm needs sbatch on PATH (run on a SLURM login node), or use LAUNCHER=local")
    compute_opts, table_opts = sbatch_options(env)
    outcomes = dict(outcomes or {})
    ledger = read_ledger(s)
    live = squeue_states([e["id"] for e in ledger.values()])
    subdir = os.path.join(_out_abs(s), SLURM_DIR, s.ts)
    try:
        os.makedirs(subdir, exist_ok=True)
        ledger_file = open(os.path.join(_out_abs(s), SLURM_DIR, LEDGER), "a")
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
            st = inspect(job, s)
            if st.name == "running":
                outcomes[job.dir] = Outcome("running", st.note)
                runner.say(st.note)
                continue
            if st.name == "mismatch":
                outcomes[job.dir] = Outcome("refused", f"{job.name}: {st.note}")
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
            with open(stem + ".json", "w") as f:
                json.dump({"settings": s.__dict__, "job": job.__dict__}, f, indent=1)
            with open(stem + ".sh", "w") as f:
                f.write(_batch_script(s, stem + ".json", job.name))
            cmd = ["sbatch", "--parsable", f"--job-name=spl-{job.kind}-{job.dataset}-s{job.seed}",
                   f"--output={stem}-%j.out", f"--chdir={s.repo}", *compute_opts]
            if dep_ids:  # and cancelled when its training fails, so the table job (afterany) still runs
                cmd += [f"--dependency=afterok:{':'.join(dep_ids)}", "--kill-on-invalid-dep=yes"]
            cmd.append(stem + ".sh")
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                outcomes[job.dir] = Outcome("failed", f"{job.name}: sbatch failed: "
                                                      f"{(r.stderr.strip().splitlines() or ['?'])[-1]} ({quote(cmd)})")
                continue
            jid = r.stdout.strip().split(";")[0]
            ids[job.dir] = jid
            submitted += 1
            outcomes[job.dir] = Outcome("submitted")
            ledger_file.write(json.dumps({"dir": job.dir, "id": jid, "kind": job.kind, "ts": s.ts,
                                          "log": f"{stem}-{jid}.out"}) + "\n")
            ledger_file.flush()
            runner.say(f"submitted {job.name} as SLURM job {jid}"
                       + (f" (after {', '.join(dep_ids)})" if dep_ids else ""))
    table_note = ""
    if ids:
        table_cmd = quote([*s.python, "-m", "spotlighter.results", *runner.table_args()])
        script = os.path.join(subdir, "table.sh")
        with open(script, "w") as f:
            f.write("\n".join(["#!/bin/bash", "# spotlighter.run: the end-of-protocol table",
                               f"cd {shlex.quote(s.repo)}",
                               f"export PYTHONPATH={shlex.quote(s.repo)}${{PYTHONPATH:+:$PYTHONPATH}}",
                               table_cmd, ""]))
        cmd = ["sbatch", "--parsable", "--job-name=spl-table", f"--output={subdir}/table-%j.out",
               f"--chdir={s.repo}", *table_opts, f"--dependency=afterany:{':'.join(ids.values())}", script]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            jid = r.stdout.strip().split(";")[0]
            table_note = f"{subdir}/table-{jid}.out"
            runner.say(f"submitted the table as SLURM job {jid} -> {table_note}")
        else:
            failures.append(f"table: sbatch failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    else:
        runner.table(jobs)
    from .cli import report
    reused = sum(1 for o in outcomes.values() if o.status == "submitted") - submitted
    code = report(runner, {d: o for d, o in outcomes.items() if o.status != "submitted"}, failures,
                  headline=f"submitted: {submitted} job(s)" + (f", {reused} already queued" if reused else ""))
    args = [s.protocol, s.typed_trainer, *([s.dataset] if s.dataset else []), str(s.shots), *s.extra]
    runner.say(f"where they stand: {quote(['python', '-m', 'spotlighter.run', 'status', *args])} "
               "(with the same SEEDS/CFG/OUTPUT/DATASETS/SOURCE)")
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
