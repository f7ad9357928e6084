"""``python -m spotlighter.run demo [KEY VALUE ...]`` (what scripts/demo.sh runs): all three protocols
on MiniBench. KEY VALUE pairs go to every train.py call, as for the protocol scripts.

Checks that this project and Dassl are installed, prepares MiniBench, its cross-dataset and DG
targets and the small CLIP (``python -m spotlighter.benchmark prepare``, cached under ``$DATA``), runs
base-to-novel, cross-dataset and domain generalisation for every ``DEMO_RUNS`` entry and seed as ONE
job graph through the local launcher (DG's evaluations wait for xd's training of the same trainer
and seed, whose model they evaluate), with progress and a cost-weighted ETA for the whole demo, and
prints the three tables (CSV always, PNG with deltas when matplotlib is installed).

Environment:
  DATA            datasets folder (default <repo>/data); MiniBench is generated there once
  OUTPUT          output root (default <repo>/output/demo)
  SEEDS           default "1 2 3"
  PYTHON          interpreter of train.py, the benchmark and the results tool (default python)
  DEMO_PROTOCOLS  default "base2new xd dg" (DEMO_PROTOCOLS=base2new: the short run)
  DEMO_RUNS       "trainer[:config] ..." (default: DEFAULT_RUNS below; a trainer alone runs its MiniBench
                  config from spotlighter/registry.py); configs under
                  configs/trainers/<Trainer>/, e.g. spotlighter:minibench_ep10_release,
                  cocoop:minibench_ep2_batch1_ctx4, maple:minibench_ep5_batch4_2ctx_depth3
  FORCE=1         re-run finished jobs (old folders move to $OUTPUT/backup/<time>/)
  JOBS=N, GPUS    jobs at a time, as for the protocol runner (default without GPUS: one per core, at
                  most MAX_DEFAULT_JOBS, each with cores // N threads unless OMP_NUM_THREADS is set)
  DRY_RUN=1       print the commands instead of running them
  RUNNER_FORK=0   start every job as a fresh interpreter (default: from a pre-imported fork server)
Finished jobs are skipped on a re-run. Each job's output is in <its folder>/run-<time>.log (Dassl's
log.txt beside it). Exit status: 0 all done, 1 a job or a table failed, 2 bad input or no Dassl.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .. import machine, registry
from .protocol import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, REPO, ProtocolRun, accuracy_of, check_writable,
                       force_aside, job_starter, launcher_of, report, settings_from, share_cores, slots_of)
from .jobs import RUN_LOG, InputError, Job, Outcome, Settings, build_graph, quote, source_dir
from .local import fmt_seconds, run_local

DEFAULT_PROTOCOLS: Tuple[str, ...] = ("base2new", "xd", "dg")
#: The demo's trainers, each with its MiniBench config from the registry.
DEFAULT_TRAINERS: Tuple[str, ...] = ("zsclip", "coop", "spotlighter")
DEFAULT_RUNS = " ".join(f"{t}:{registry.trainer(t).minibench_config}" for t in DEFAULT_TRAINERS)
SHOTS = 16
DATASET = registry.MINIBENCH  # base-to-novel dataset and xd/dg source
DEFAULT_DATA = os.path.join(REPO, "data")
DEFAULT_OUTPUT = os.path.join(REPO, "output", "demo")
#: Jobs at a time when neither JOBS nor GPUS is set: one per core up to this many. The demo's models are
#: tiny, so one thread per job beats several threads per job (2-core Intel Xeon: base-to-novel 2m40s with
#: 2 jobs x 1 thread against 3m00s with 1 job x 2 threads, measured side by side).
MAX_DEFAULT_JOBS = 8
#: What the demo's train.py calls import, and what to do when they cannot be imported.
PROJECT_IMPORTS = "import spotlighter, clip, yacs, tabulate"
DASSL_IMPORT = "import dassl.engine"
DASSL_DEPENDENCIES = ("gdown", "tensorboard", "scikit-learn", "wilds")
NO_DASSL = """error: upstream Dassl.pytorch is not installed (it is not on PyPI). Install it once:
    pip install gdown tensorboard scikit-learn wilds
    git clone https://github.com/KaiyangZhou/Dassl.pytorch && cd Dassl.pytorch && git checkout c61a1b5
    pip install --no-build-isolation --no-deps -e .
then run bash scripts/demo.sh again (README: Install)."""


def parse_protocols(text: Optional[str]) -> List[str]:
    names = (text if text is not None else " ".join(DEFAULT_PROTOCOLS)).split()
    valid = " ".join(DEFAULT_PROTOCOLS)
    for p in names:
        if p not in DEFAULT_PROTOCOLS:
            raise InputError(f"DEMO_PROTOCOLS: unknown protocol '{p}' (valid: {valid})")
    if not names:
        raise InputError(f"DEMO_PROTOCOLS is empty (valid: {valid})")
    return list(dict.fromkeys(names))


def parse_runs(text: Optional[str]) -> List[Tuple[str, str]]:
    """``"trainer[:config] ..."`` -> [(trainer CLI name, config)], checked against the registry and
    configs/; a trainer without ``:config`` runs its MiniBench config."""
    runs = []
    for entry in (text if text is not None else DEFAULT_RUNS).split():
        trainer_text, sep, cfg = entry.partition(":")
        if not trainer_text or (sep and not cfg):
            raise InputError(f"DEMO_RUNS: '{entry}' is not trainer or trainer:config (e.g. coop:minibench_ep10_ctx4)")
        try:
            t = registry.trainer(trainer_text)
        except registry.RegistryError as exc:
            raise InputError(f"DEMO_RUNS entry '{entry}': {exc}") from None
        cfg = cfg or t.config_for(DATASET)
        if not os.path.isfile(os.path.join(REPO, t.config_file(cfg))):
            avail = t.available_configs(REPO)
            raise InputError(f"DEMO_RUNS entry '{entry}': {t.config_file(cfg)} does not exist; configs of "
                             f"{t.cli}: {' '.join(avail) or '(none)'}")
        runs.append((t.cli, cfg))
    if not runs:
        raise InputError(f"DEMO_RUNS is empty (e.g. DEMO_RUNS=\"{DEFAULT_RUNS}\")")
    return list(dict.fromkeys(runs))


@dataclass
class Plan:
    """The demo's one job graph, each job's Settings and protocol, and the seeds it could not run."""

    protocols: List[str]
    runs: List[Tuple[str, str]]
    settings: List[Settings] = field(default_factory=list)
    jobs: List[Job] = field(default_factory=list)
    settings_of: Dict[str, Settings] = field(default_factory=dict)  # job folder -> its Settings
    protocol_of: Dict[str, str] = field(default_factory=dict)  # job folder -> protocol
    failures: List[str] = field(default_factory=list)

    def jobs_of(self, protocol: str) -> List[Job]:
        return [j for j in self.jobs if self.protocol_of[j.dir] == protocol]


def protocol_env(env: Dict[str, str], cfg: str) -> Dict[str, str]:
    out = {k: v for k, v in env.items() if k != "DATASETS"}  # xd/dg: the source's registered targets
    out.update(CFG=cfg, SOURCE=DATASET)
    return out


def plan(protocols: Sequence[str], runs: Sequence[Tuple[str, str]], env: Dict[str, str], cwd: str,
         extra: Sequence[str] = ()) -> Plan:
    """Every (protocol, run, seed) job in one graph, in the order one slot runs them.

    ``extra``: trailing KEY VALUE options for every train.py call (as for the protocol scripts)."""
    p = Plan(list(protocols), list(runs))
    ts = time.strftime("%Y%m%d-%H%M%S")
    for protocol in protocols:
        for trainer, cfg in runs:
            args = [trainer, DATASET, str(SHOTS)] if protocol == "base2new" else [trainer, str(SHOTS)]
            args += list(extra)
            s = settings_from(protocol, args, protocol_env(env, cfg), cwd)
            s.ts = ts  # one run-<time>.log name for the whole demo
            jobs = build_graph(s)
            if protocol == "dg" and s.trains:
                if "xd" in protocols:  # evaluate the model xd trains in this same run, once it has
                    for job in jobs:
                        job.deps = list(dict.fromkeys(job.deps + [source_dir(s, job.seed)]))
                else:
                    jobs, failures = ProtocolRun(s).check_trained(jobs)
                    p.failures += failures
            p.settings.append(s)
            for job in jobs:
                if job.dir in p.settings_of:  # the same folder from two entries: run it once
                    continue
                p.jobs.append(job)
                p.settings_of[job.dir] = s
                p.protocol_of[job.dir] = protocol
    return p


def table_commands(p: Plan, python: Sequence[str], output: str, seeds: Sequence[int],
                   plot: bool) -> List[Tuple[str, List[str]]]:
    """(protocol, results-tool command) for each protocol: only this demo's trainers and configs."""
    seeds_csv = ",".join(map(str, seeds))
    trainers = ",".join(sorted({t for t, _ in p.runs}))
    configs = ",".join(sorted({c for _, c in p.runs}))
    out = []
    for protocol in p.protocols:
        pl = ["--plot", os.path.join(output, f"{DATASET}_{protocol}.png"), "--plot-deltas"] if plot else []
        csv = ["--csv", os.path.join(output, f"{DATASET}_{protocol}.csv")]
        if protocol == "base2new":
            cmd = ["base2new", "--root", output, "--datasets", DATASET, "--shots", str(SHOTS), "--trainers", trainers,
                   "--configs", configs, "--seeds", seeds_csv, *csv, "--no-published", *pl]
        else:
            cmd = [protocol, "--root", output, "--source", DATASET, "--shots", str(SHOTS), "--trainers", trainers,
                   "--configs", configs, "--seeds", seeds_csv, *csv, *pl]
        out.append((protocol, [*python, "-m", "spotlighter.results", *cmd]))
    return out


class Clock:
    """Per-protocol wall time (first job start to last outcome) and the '== protocol' lines."""

    def __init__(self, p: Plan, say, known: Dict[str, Outcome]):
        self.p, self.say = p, say
        # jobs decided before the run (FORCE=1 found their folder locked) get no outcome call
        self.left = {proto: len([j for j in p.jobs_of(proto) if j.dir not in known]) for proto in p.protocols}
        self.first: Dict[str, float] = {}
        self.last: Dict[str, float] = {}

    def started(self, job: Job) -> None:
        proto = self.p.protocol_of[job.dir]
        if proto not in self.first:
            self.first[proto] = time.monotonic()
            self.say(f"== protocol {proto} ({self.left[proto]} jobs)")

    def outcome(self, job: Job, out: Outcome) -> None:
        proto = self.p.protocol_of[job.dir]
        self.last[proto] = time.monotonic()
        self.left[proto] -= 1
        if self.left[proto] == 0 and not out.ran:  # a job that ran says it in its finish line (describe)
            self.say(f"== {proto} done in {fmt_seconds(self.seconds(proto))}")

    def describe(self, job: Job, out: Outcome) -> str:
        """The finish line's text of a job that ran: what it was, its accuracy, and (the protocol's
        last job) the protocol's wall time."""
        proto = self.p.protocol_of[job.dir]
        s = self.p.settings_of[job.dir]
        text = f"{proto} {s.typed_trainer} ({s.cfg}) seed {job.seed}, {job.what}"
        if out.status == "done":
            acc = accuracy_of(job.dir)
            text += f": accuracy {'NA' if acc is None else f'{acc:.2f}%'}"
        else:
            text += f" ({job.dir})"
        if self.left[proto] == 0:
            text += f"; == {proto} done in {fmt_seconds(self.seconds(proto))}"
        return text

    def seconds(self, proto: str) -> float:
        if proto not in self.first:
            return 0.0
        return self.last.get(proto, self.first[proto]) - self.first[proto]


def prepare_command(python: Sequence[str], data: str) -> List[str]:
    """Generate MiniBench, its targets and the small CLIP under DATA (cached: a no-op when built)."""
    return [*python, "-m", "spotlighter.benchmark", "prepare", "--root", data]


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check_install(python: Sequence[str]) -> Optional[int]:
    """Install this project's dependencies / Dassl's if missing; EXIT_USAGE (message printed) without Dassl."""
    def ok(code: str) -> bool:
        return subprocess.run([*python, "-c", code], capture_output=True).returncode == 0

    if not ok(PROJECT_IMPORTS):
        say("installing this project and its dependencies (pip install -e .)")
        subprocess.run([*python, "-m", "pip", "install", "-q", "-e", REPO], check=False)
    if not ok(DASSL_IMPORT):
        if ok("import dassl"):
            say(f"installing Dassl's import-time dependencies ({' '.join(DASSL_DEPENDENCIES)})")
            subprocess.run([*python, "-m", "pip", "install", "-q", *DASSL_DEPENDENCIES], check=False)
        else:
            print(NO_DASSL, file=sys.stderr)
            return EXIT_USAGE
    return None


def default_jobs(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` with JOBS set to one per core (at most MAX_DEFAULT_JOBS) when neither JOBS nor GPUS is."""
    if env.get("JOBS") or env.get("GPUS"):
        return env
    return {**env, "JOBS": str(max(1, min(machine.cores(), MAX_DEFAULT_JOBS)))}


def run_demo(args: Sequence[str], env: Dict[str, str], cwd: str) -> int:
    if list(args) in (["-h"], ["--help"]):
        print(__doc__)
        return EXIT_OK
    protocols = parse_protocols(env.get("DEMO_PROTOCOLS"))
    runs = parse_runs(env.get("DEMO_RUNS"))
    if launcher_of(env) != "local":
        raise InputError("the demo runs on this machine (LAUNCHER=local); on a cluster run scripts/base2new.sh, "
                         "xd.sh and dg.sh with LAUNCHER=slurm")
    env = default_jobs(env)
    slots, gpus = slots_of(env)
    env = {**env, "DATA": env.get("DATA") or DEFAULT_DATA, "OUTPUT": env.get("OUTPUT") or DEFAULT_OUTPUT}
    dry = env.get("DRY_RUN", "0") not in ("", "0")
    python = (env.get("PYTHON") or "python").split()
    data = env["DATA"] if os.path.isabs(env["DATA"]) else os.path.normpath(os.path.join(cwd, env["DATA"]))
    os.chdir(REPO)
    start = time.monotonic()
    prepare = prepare_command(python, data)
    if dry:
        print(f"cd {quote([REPO])}")
        print(quote(prepare))
    else:
        code = check_install(python)
        if code is not None:
            return code
        say(f"preparing MiniBench and its targets in {data} (first run: image generation and the shipped "
            "CLIP's zero-shot checks, about a minute)")
        r = subprocess.run(prepare)
        if r.returncode != 0:
            print(f"error: '{quote(prepare)}' failed (exit status {r.returncode}); see above", file=sys.stderr)
            return r.returncode if r.returncode > 0 else EXIT_FAILED
        say(f"prepared in {fmt_seconds(time.monotonic() - start)}")
    p = plan(protocols, runs, env, cwd, extra=args)
    s0 = p.settings[0]
    if dry:
        for s in p.settings:
            runner = ProtocolRun(s)
            runner.header()
            runner.dry_run([j for j in p.jobs if p.settings_of[j.dir] is s])
        for _proto, cmd in table_commands(p, python, s0.output, s0.seeds, plot=True):
            print(quote(cmd))
        return EXIT_OK
    problem = check_writable(s0)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    say(f"{' '.join(protocols)} | {' '.join(f'{t}:{c}' for t, c in runs)} | seeds {' '.join(map(str, s0.seeds))} | "
        f"{len(p.jobs)} jobs | OUTPUT={s0.output}")
    say(f"each job's output: <its folder>/{RUN_LOG.format(ts=s0.ts)} (Dassl's log.txt beside it)")
    known = force_aside(p.jobs, lambda job: p.settings_of[job.dir], say) if s0.force else {}
    share_cores(env, slots, say)
    starter = job_starter(s0, env, say)
    clock = Clock(p, say, known)
    outcomes = run_local(p.jobs, s0, say, slots=slots, gpus=gpus, known=known, start=starter, echo=False,
                         settings_of=lambda job: p.settings_of[job.dir], on_start=clock.started,
                         on_outcome=clock.outcome, detail=clock.describe)
    status = report(types.SimpleNamespace(say=say), outcomes, p.failures)
    has_plot = subprocess.run([*python, "-c", "import matplotlib"], capture_output=True).returncode == 0
    failed_tables = 0
    for proto, cmd in table_commands(p, python, s0.output, s0.seeds, plot=has_plot):
        print(flush=True)
        if subprocess.run(cmd).returncode != 0:
            say(f"no {proto} table (see above)")
            failed_tables += 1
    print(flush=True)
    for proto in protocols:
        say(f"{proto}: {fmt_seconds(clock.seconds(proto))} wall ({len(p.jobs_of(proto))} jobs)")
    say(f"total time {fmt_seconds(time.monotonic() - start)}")
    if failed_tables:
        say(f"{failed_tables} table(s) failed")
    return EXIT_FAILED if status != EXIT_OK or failed_tables else EXIT_OK
