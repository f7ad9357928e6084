"""``python -m spotlighter.run``: the protocol runner (what scripts/base2new.sh, xd.sh, dg.sh, fewshot.sh call).

    python -m spotlighter.run base2new TRAINER DATASET SHOTS [KEY VALUE ...]
    python -m spotlighter.run xd TRAINER SHOTS [KEY VALUE ...]
    python -m spotlighter.run dg TRAINER SHOTS [KEY VALUE ...]
    python -m spotlighter.run fewshot TRAINER DATASET [KEY VALUE ...]   # CoOp's few-shot protocol (SHOTS)
    python -m spotlighter.run demo [KEY VALUE ...]          # all three protocols on MiniBench (demo --help)
    python -m spotlighter.run status PROTOCOL ARGS...     # done / running / queued / failed, ETA
    python -m spotlighter.run job SPEC.json                 # one job (what a SLURM job runs)

Environment (all optional except DATA):
  DATA       folder that holds every dataset (CoOp's $DATA layout, see DATASETS.md); required
  SEEDS      seeds to run (default "1 2 3")
  SHOTS      fewshot: the shot counts, one training each per seed (default "1 2 4 8 16")
  CFG        trainer config under configs/trainers/<Trainer>/ (default: the trainer's own; on MiniBench
             its MiniBench config, both in spotlighter/registry.py)
  OUTPUT     output root (default "output" in the repository)
  PYTHON     interpreter that runs train.py (default "python"; may hold several words)
  RUNNER_PYTHON  (scripts/*.sh) the interpreter of this runner (default: python, else python3)
  TEACHER=train  a distilling trainer (promptkd): train its teacher (PromptSRC, once per dataset,
             seed 1, under OUTPUT/teachers/) in the same job graph before the students; otherwise the
             student reads TRAINER.PROMPTKD.TEACHER (default teacher_model/<DATASET.NAME>/)
  TEACHER_CFG  the teacher's config (default in spotlighter/registry.py: vit_l14_c2_ep20_batch8_4+4ctx)
  DATASETS   xd/dg targets (default: the source's targets in spotlighter/registry.py; empty: xd only trains)
  SOURCE     xd/dg source dataset (default imagenet)
  FORCE=1    re-run finished jobs; old folders move to $OUTPUT/backup/<time>/<same path>
  DRY_RUN=1  print every command (a runnable script) instead of running it; LAUNCHER=slurm: the
             sbatch commands with their dependencies
  LAUNCHER   local (default) | slurm
  JOBS=N     local: run N jobs at a time (default 1, or one per GPUS entry); with N > 1 and no
             OMP_NUM_THREADS / MKL_NUM_THREADS set, each job gets cores // N threads
  GPUS="0 1" local: one job per listed device at a time, each with its own CUDA_VISIBLE_DEVICES
  RUNNER_FORK=0  local: start every job as a fresh interpreter; by default, when PYTHON is this
             runner's interpreter, jobs are forked from a server that imported torch and Dassl once
             (spotlighter/run/fast.py)
  SLURM_PARTITION SLURM_ACCOUNT SLURM_TIME SLURM_GPUS_PER_JOB SLURM_CPUS_PER_JOB SLURM_MEM_PER_JOB
  SLURM_EXTRA SLURM_SIGNAL_MARGIN SLURM_REQUEUE SLURM_CONFIG   slurm: sbatch options (see
             spotlighter/run/slurm.py; a job is warned 300 s before its time limit, checkpoints and requeues)
Relative DATA and OUTPUT are relative to the directory the command is called from.
Exit status: 0 every job finished (or was skipped as finished; slurm: everything submitted),
1 some job failed, was refused (finished or interrupted with other options), was stopped by a
signal (re-run to resume) or runs elsewhere, 2 bad input; a SLURM job stopped with a checkpoint: 75.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from typing import Dict, Optional, Sequence

from .. import preempt, registry
from .jobs import InputError, Outcome, Settings, build_graph, run_one, source_dir
from .local import run_local
from .protocol import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, ProtocolRun, check_writable, force_aside, job_starter,
                       launcher_of, missing_configs, missing_data, report, settings_from, share_cores, slots_of)


def run_protocol(protocol: str, args: Sequence[str], env: Dict[str, str], cwd: str) -> int:
    s = settings_from(protocol, args, env, cwd)
    launcher = launcher_of(env)
    slots, gpus = slots_of(env)
    runner = ProtocolRun(s)
    no_config = missing_configs(s)
    if no_config and not s.dry_run:
        raise InputError("\n       ".join(no_config))
    missing = missing_data(s)
    if missing:
        if not s.dry_run:
            for _name, line in missing:
                print(f"error: {line}", file=sys.stderr)
            print(f"       check everything with: python scripts/check_data.py --root {s.data} "
                  f"{' '.join(n for n, _ in missing)}", file=sys.stderr)
            return EXIT_USAGE
    os.chdir(s.repo)
    runner.header()
    for line in no_config + [line for _name, line in missing]:
        runner.say(f"warning: {line}")
    jobs = build_graph(s)
    queued: Dict[str, str] = {}
    if s.protocol == "dg" and launcher == "slurm" and s.trains and not s.dry_run:
        from .slurm import queued_trainings
        queued = queued_trainings(s, [source_dir(s, seed) for seed in s.seeds])
    jobs, failures = runner.check_trained(jobs, queued) if s.protocol == "dg" else (jobs, [])
    if s.dry_run and launcher == "slurm":  # what would be submitted: a script of sbatch commands
        from .slurm import submit
        known = force_aside(jobs, lambda _job: s, runner.say) if s.force else {}
        moved = [j.dir for j in jobs if s.force and os.path.exists(j.dir) and j.dir not in known]
        submit(runner, jobs, env, failures, known, queued=queued, moved=moved)
        return EXIT_OK
    if s.dry_run:
        runner.dry_run(jobs)
        runner.table(jobs)
        return EXIT_OK
    problem = check_writable(s)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    outcomes: Dict[str, Outcome] = {}
    if s.force:
        outcomes = force_aside(jobs, lambda _job: s, runner.say)
    if launcher == "slurm":
        from .slurm import submit
        return submit(runner, jobs, env, failures, outcomes, queued=queued)
    share_cores(env, slots, runner.say)
    start = job_starter(s, env, runner.say)
    outcomes = run_local(jobs, s, runner.say, slots=slots, gpus=gpus, known=outcomes, start=start)
    runner.table(jobs)
    return report(runner, outcomes, failures)


def run_job_spec(path: str) -> int:
    """One job from a spec file (a SLURM job's command): same decisions as a local run."""
    from .jobs import Job as _Job
    # the time-limit warning may come at any moment: never the default action (terminate) in this
    # runner, nor in train.py before it installs its handler (an ignored signal stays ignored across exec)
    signal.signal(preempt.REQUEUE_SIGNAL, signal.SIG_IGN)
    with open(path) as f:
        spec = json.load(f)
    s = Settings(**spec["settings"])
    job = _Job(**spec["job"])
    os.chdir(s.repo)
    runner = ProtocolRun(s)
    runner.prefix = "[job]"
    out = run_one(job, s, runner.say, echo=True, forward_signals=True)
    if out.message:
        print(f"{out.status}: {out.message}", file=sys.stderr)
    if out.status == "stopped":
        from .slurm import requeue_self
        requeue_self(out, runner.say)
        return preempt.EXIT_RESUMABLE
    return EXIT_OK if out.status in ("done", "skipped") else EXIT_FAILED


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    cwd = env.get("RUN_CALLER_PWD") or os.getcwd()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return EXIT_OK if argv else EXIT_USAGE
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "job":
            if len(rest) != 1:
                raise InputError("usage: python -m spotlighter.run job SPEC.json")
            return run_job_spec(rest[0])
        if cmd == "status":
            if not rest:
                raise InputError("usage: python -m spotlighter.run status PROTOCOL TRAINER [DATASET] SHOTS [KEY VALUE ...] "
                                 "(fewshot: no SHOTS argument; SHOTS in the environment)")
            from .slurm import status
            s = settings_from(rest[0], rest[1:], {**env, "DRY_RUN": "1"}, cwd)
            os.chdir(s.repo)
            return status(s, build_graph(s))
        if cmd == "demo":
            from .demo import run_demo
            return run_demo(rest, env, cwd)
        if cmd not in registry.PROTOCOLS:
            raise InputError(f"unknown protocol '{cmd}'; known: {', '.join(registry.PROTOCOLS)}, demo, status, "
                             "job\n" + __doc__.split("Environment")[0].strip())
        return run_protocol(cmd, rest, env, cwd)
    except (InputError, registry.RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to continue (finished jobs are skipped, "
              "interrupted training resumes)", file=sys.stderr)
        return 130
