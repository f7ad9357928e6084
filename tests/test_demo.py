"""``python -m spotlighter.run demo`` / scripts/demo.sh without Dassl: DEMO_PROTOCOLS / DEMO_RUNS
parsing and errors, the one graph over the protocols (DG after xd's training), the ETA from the cost
prior and from measured means, the table commands, and whole demo runs through the stub interpreter."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from spotlighter import machine, registry
from spotlighter.run import demo
from spotlighter.run.jobs import EVAL, TRAIN, InputError, Job
from spotlighter.run.local import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = "zsclip:minibench coop:minibench_ep10_ctx4"

WRAPPER = r'''#!{python}
"""PYTHON for the demo: answers its install checks and `benchmark prepare`, else the train.py stub."""
import os, sys
a = sys.argv[1:]
if a[:1] == ["-c"]:
    if "dassl" in a[1]:
        sys.exit(1 if os.environ.get("STUB_NO_DASSL") else 0)
    if "matplotlib" in a[1]:
        sys.exit(0 if os.environ.get("STUB_PLOT") else 1)
    if a[1].startswith("import spotlighter"):
        sys.exit(0)
if a[:3] == ["-m", "spotlighter.benchmark", "prepare"]:
    print("PREPARE", *a[3:], flush=True)
    sys.exit(0)
os.execv({stub!r}, [{stub!r}] + a)
'''


# ------------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------------
def test_protocols_default_subset_and_errors():
    assert demo.parse_protocols(None) == ["base2new", "xd", "dg"]
    assert demo.parse_protocols("dg base2new dg") == ["dg", "base2new"]
    with pytest.raises(InputError, match=r"^DEMO_PROTOCOLS: unknown protocol 'b2n' \(valid: base2new xd dg\)$"):
        demo.parse_protocols("base2new b2n")
    with pytest.raises(InputError, match="DEMO_PROTOCOLS is empty"):
        demo.parse_protocols(" ")


def test_runs_default_and_errors():
    assert demo.parse_runs(None) == [("zsclip", "minibench"), ("coop", "minibench_ep50_ctx16"),
                                     ("spotlighter", "minibench_ep10_paper")]
    assert demo.parse_runs("CoOp:minibench_ep10_ctx4 coop:minibench_ep10_ctx4") == [("coop", "minibench_ep10_ctx4")]
    assert demo.parse_runs("coop promptsrc") == [("coop", "minibench_ep50_ctx16"),
                                                 ("promptsrc", "minibench_ep20_batch4_4+4ctx_depth3")]
    with pytest.raises(InputError, match=r"DEMO_RUNS: 'coop:' is not trainer or trainer:config"):
        demo.parse_runs("coop:")
    with pytest.raises(InputError, match=r"DEMO_RUNS entry 'clip:minibench': unknown trainer 'clip'. Valid trainers"):
        demo.parse_runs("clip:minibench")
    with pytest.raises(InputError) as e:
        demo.parse_runs("coop:minibench_ep99")
    assert "configs/trainers/CoOp/minibench_ep99.yaml does not exist; configs of coop:" in str(e.value)
    assert "minibench_ep10_ctx4" in str(e.value)


# ------------------------------------------------------------------------------------------------
# the graph
# ------------------------------------------------------------------------------------------------
def test_one_graph_over_the_protocols_dg_waits_for_xd_training(tmp_path):
    env = {"DATA": str(tmp_path), "OUTPUT": str(tmp_path / "out"), "SEEDS": "1 2", "DATASETS": "dtd"}
    p = demo.plan(["base2new", "xd", "dg"], demo.parse_runs(RUNS), env, str(tmp_path))
    by = {proto: p.jobs_of(proto) for proto in p.protocols}
    # per run and seed: base2new 2 jobs; xd the source + 3 targets (ZS: all evaluations); dg 3 targets
    assert [len(by[x]) for x in ("base2new", "xd", "dg")] == [8, 16, 12]
    assert len({j.dir for j in p.jobs}) == len(p.jobs) == 36
    assert [p.protocol_of[j.dir] for j in p.jobs] == ["base2new"] * 8 + ["xd"] * 16 + ["dg"] * 12  # one slot's order
    xd_train = {(j.trainer, j.seed): j.dir for j in by["xd"] if j.kind == TRAIN}
    assert set(xd_train) == {("CoOp", 1), ("CoOp", 2)}
    for j in by["dg"]:
        assert j.dataset in registry.DG_TARGETS["minibench"] and j.kind == EVAL
        if j.trainer == "CoOp":  # evaluates xd's model: waits for that training, in the same graph
            assert j.deps == [xd_train[("CoOp", j.seed)]] and j.model_dir == xd_train[("CoOp", j.seed)]
        else:
            assert j.deps == [] and j.model_dir is None
    assert {j.dataset for j in by["xd"]} == {"minibench", *registry.XD_TARGETS["minibench"]}  # DATASETS ignored
    assert {p.settings_of[j.dir].cfg for j in p.jobs} == {"minibench", "minibench_ep10_ctx4"}
    assert len({p.settings_of[j.dir].ts for j in p.jobs}) == 1 and not p.failures


def test_dg_without_xd_needs_a_trained_source(tmp_path):
    env = {"DATA": str(tmp_path), "OUTPUT": str(tmp_path / "out"), "SEEDS": "1"}
    p = demo.plan(["dg"], demo.parse_runs(RUNS), env, str(tmp_path))
    assert {j.trainer for j in p.jobs} == {"ZeroshotCLIP"}  # CoOp's seed is dropped: nothing trained it
    assert len(p.failures) == 1 and "no finished minibench checkpoint in " in p.failures[0]
    assert "run scripts/xd.sh coop 16 first" in p.failures[0]


def test_tables_only_for_the_demos_trainers_and_configs(tmp_path):
    p = demo.plan(["base2new", "dg"], demo.parse_runs("coop:minibench_ep10_ctx4 zsclip:minibench"),
                  {"DATA": str(tmp_path), "OUTPUT": "/o", "SEEDS": "1 3"}, str(tmp_path))
    cmds = dict(demo.table_commands(p, ["py"], "/o", [1, 3], plot=True))
    assert cmds["base2new"] == ["py", "-m", "spotlighter.results", "base2new", "--root", "/o", "--datasets",
                                "minibench", "--shots", "16", "--trainers", "coop,zsclip", "--configs",
                                "minibench,minibench_ep10_ctx4", "--seeds", "1,3", "--csv", "/o/minibench_base2new.csv",
                                "--no-published", "--plot", "/o/minibench_base2new.png", "--plot-deltas"]
    assert cmds["dg"][3:8] == ["dg", "--root", "/o", "--source", "minibench"]
    assert "--no-published" not in cmds["dg"] and cmds["dg"][-3:] == ["--plot", "/o/minibench_dg.png", "--plot-deltas"]
    no_plot = dict(demo.table_commands(p, ["py"], "/o", [1, 3], plot=False))
    assert "--plot" not in no_plot["dg"] and no_plot["dg"][-2:] == ["--csv", "/o/minibench_dg.csv"]


# ------------------------------------------------------------------------------------------------
# the ETA
# ------------------------------------------------------------------------------------------------
def job(trainer, kind, n=0):
    return Job(kind, f"d/{trainer}/{kind}/{n}", [], [], 1, "minibench", kind, trainer=trainer)


def test_eta_from_the_cost_prior_then_from_measured_means():
    cost = {t.name: t.cost for t in registry.TRAINERS.values()}
    p = Progress(total=4, slots=1)
    queued = [job("CoOp", TRAIN), job("Spotlighter", TRAIN), job("ZeroshotCLIP", EVAL)]
    assert p.eta(queued, {}) is None
    assert p.line(0, queued, {}).endswith("; ETA when a job has finished")
    p.add(job("CoOp", TRAIN), 10.0)
    rate = 10.0 / cost["CoOp"][0]  # seconds per unit of prior
    assert p.expected(job("Spotlighter", TRAIN)) == pytest.approx(rate * cost["Spotlighter"][0])
    assert p.expected(job("ZeroshotCLIP", EVAL)) == pytest.approx(rate * cost["ZeroshotCLIP"][1])
    assert p.eta(queued, {}) == pytest.approx(10.0 + rate * (cost["Spotlighter"][0] + cost["ZeroshotCLIP"][1]))
    p.add(job("CoOp", TRAIN), 14.0)
    p.add(job("CoOp", EVAL), 7.0)
    assert p.expected(job("CoOp", TRAIN)) == 12.0  # measured mean of its own (trainer, kind)
    rate = (12.0 / cost["CoOp"][0] + 7.0 / cost["CoOp"][1]) / 2
    assert p.expected(job("Spotlighter", EVAL)) == pytest.approx(rate * cost["Spotlighter"][1])
    assert Progress(total=4, slots=2).eta(queued, {}) is None
    two = Progress(total=4, slots=2, durations=dict(p.durations))
    assert two.eta(queued, {}) == pytest.approx(p.eta(queued, {}) / 2)  # two slots share the work
    assert re.search(r"; ETA \d+m\d\ds$", p.line(1, queued, {}))


def test_every_trainer_has_a_positive_prior_for_both_kinds():
    for t in registry.TRAINERS.values():
        assert len(t.cost) == 2 and min(t.cost) > 0, t
    assert registry.job_cost("KgCoOp", TRAIN) == registry.DEFAULT_COST[0]  # a trainer of another codebase


# ------------------------------------------------------------------------------------------------
# whole demo runs through the stub interpreter
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def denv(env):
    shutil.copy(os.path.join(ROOT, "scripts", "demo.sh"), os.path.join(env.repo, "scripts", "demo.sh"))
    for trainer, cfg in (("ZeroshotCLIP", "minibench"), ("CoOp", "minibench_ep10_ctx4"),
                         ("Spotlighter", "minibench_ep10_paper")):
        (env.tmp / "repo" / "configs" / "trainers" / trainer / f"{cfg}.yaml").write_text("OPTIM:\n  MAX_EPOCH: 2\n")
    wrapper = env.tmp / "demo_python"
    wrapper.write_text(WRAPPER.format(python=sys.executable, stub=env.stub))
    wrapper.chmod(0o755)
    env.py = str(wrapper)
    env.demo_out = str(env.tmp / "demo-out")
    return env


def rundemo(e, **extra):
    base = dict(PYTHON=e.py, OUTPUT=e.demo_out, DEMO_RUNS=RUNS, SEEDS="1 2", STUB_RESULTS=1, STUB_NO_RESULTS=None)
    base.update(extra)
    return e.run("demo.sh", **base)


def span(calls, sub, seed):
    c = next(c for c in calls if sub in c["argv"][c["argv"].index("--output-dir") + 1]
             and c["argv"][c["argv"].index("--seed") + 1] == str(seed))
    return c["start"], c["end"]


def test_whole_demo_one_graph_progress_tables_and_rerun(denv):
    e = denv
    r = rundemo(e, JOBS=2, STUB_SLEEP=0.2, OMP_NUM_THREADS=None, MKL_NUM_THREADS=None)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"PREPARE --root {e.data}" in r.stdout
    calls = e.calls()
    assert len(calls) == 36
    for seed in (1, 2):  # DG evaluates xd's CoOp model: only after that training has finished
        _, trained = span(calls, "/minibench/CoOp/minibench_ep10_ctx4_16shots/seed", seed)
        for target in registry.DG_TARGETS["minibench"]:
            assert span(calls, f"/CoOp/minibench_ep10_ctx4_16shots/{target}/seed", seed)[0] >= trained
    assert "progress: 36/36 finished, 0 running, 0 queued" in r.stdout
    assert re.search(r"progress: \d+/36 finished, \d running, \d+ queued; ETA \d+m\d\ds", r.stdout)
    for proto in ("base2new", "xd", "dg"):
        assert f"== protocol {proto} (" in r.stdout and f"== {proto} done in " in r.stdout
        assert re.search(rf"\[demo [0-9:]{{8}}\] {proto}: \d+m\d\ds wall \(\d+ jobs\)", r.stdout)
    assert "total time " in r.stdout
    assert "accuracy 81.00%" in r.stdout  # each finished job's accuracy (the stub's base accuracy, seed 1)
    assert "each job's output: <its folder>/run-" in r.stdout
    tables = [l for l in r.stdout.splitlines() if l.startswith("TABLE ")]
    assert [t.split()[1] for t in tables] == ["base2new", "xd", "dg"]
    assert all("--trainers coop,zsclip --configs minibench,minibench_ep10_ctx4 --seeds 1,2" in t for t in tables)
    assert "--plot" not in r.stdout  # no matplotlib: CSV only

    # JOBS=2 and no thread count set: each job gets cores // 2 threads (the test env sets none)
    assert {c["omp"] for c in calls} == {str(max(1, machine.cores() // 2))}
    assert f"JOBS=2 on {machine.cores()} cores: " in r.stdout

    again = rundemo(e, STUB_PLOT=1)
    assert again.returncode == 0, again.stderr
    assert "skip (finished): 36 job(s) whose folders hold a finished run" in again.stdout and len(e.calls()) == 36
    assert "finished (" not in again.stdout  # one line for the 36, none each
    assert "--plot-deltas" in again.stdout


def test_default_jobs_one_per_core_and_threads_shared(monkeypatch):
    from spotlighter.run import protocol

    monkeypatch.setattr(machine, "cores", lambda: 4)
    assert demo.default_jobs({})["JOBS"] == "4"
    assert demo.default_jobs({"JOBS": "1"})["JOBS"] == "1" and "JOBS" not in demo.default_jobs({"GPUS": "0 1"})
    monkeypatch.setattr(machine, "cores", lambda: 64)
    assert demo.default_jobs({})["JOBS"] == str(demo.MAX_DEFAULT_JOBS)
    monkeypatch.setattr(machine, "cores", lambda: 4)
    monkeypatch.setattr(protocol.os, "environ", {})
    said, env = [], {}
    assert protocol.share_cores(env, 3, said.append) == 1 and env["OMP_NUM_THREADS"] == "1"
    assert protocol.os.environ == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the fork server inherits it
    env = {}
    assert protocol.share_cores(env, 2, said.append) == 2 and env == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert said[-1] == "JOBS=2 on 4 cores: 2 thread(s) per job (OMP_NUM_THREADS=2; set it to choose)"
    protocol.os.environ.clear()
    assert protocol.share_cores({"OMP_NUM_THREADS": "3"}, 2, said.append) is None  # the user's choice stands
    assert protocol.share_cores({}, 1, said.append) is None and protocol.os.environ == {}


def test_failed_job_exit_1_its_log_and_dg_not_run(denv):
    e = denv
    r = rundemo(e, SEEDS="1", DEMO_PROTOCOLS="xd dg", STUB_FAIL="minibench/CoOp/minibench_ep10_ctx4_16shots/seed1")
    assert r.returncode == 1
    failed = next(l for l in r.stderr.splitlines() if "CoOp/minibench_ep10_ctx4_16shots/seed1: exit status 1; see " in l)
    assert "/run-" in failed and failed.rstrip(")").endswith("log.txt")
    not_run = [l for l in r.stderr.splitlines() if "not run: training on minibench failed" in l]
    assert len(not_run) == 6  # xd's 3 and dg's 3 evaluations of that model
    assert "TABLE xd" in r.stdout and "TABLE dg" in r.stdout  # the tables still show what finished


def test_bad_input_exit_2_before_anything_runs(denv):
    e = denv
    r = rundemo(e, DEMO_PROTOCOLS="base2new cross")
    assert r.returncode == 2 and "PREPARE" not in r.stdout and not e.calls()
    assert r.stderr.strip() == "error: DEMO_PROTOCOLS: unknown protocol 'cross' (valid: base2new xd dg)"
    r = rundemo(e, DEMO_RUNS=":minibench")
    assert r.returncode == 2 and "is not trainer or trainer:config" in r.stderr
    r = rundemo(e, JOBS="two")
    assert r.returncode == 2 and r.stderr.strip() == "error: JOBS must be a positive integer, got 'two'"
    r = rundemo(e, STUB_NO_DASSL=1)
    assert r.returncode == 2 and "PREPARE" not in r.stdout and not e.calls()
    assert r.stderr.startswith("error: upstream Dassl.pytorch is not installed (it is not on PyPI). Install it once:")
    assert "then run bash scripts/demo.sh again (README: Install)." in r.stderr


def test_dry_run_prints_runnable_commands(denv):
    e = denv
    r = rundemo(e, DRY_RUN=1, SEEDS="1", DEMO_PROTOCOLS="xd dg", DATA=str(e.tmp / "not-yet"))
    assert r.returncode == 0, r.stderr
    assert f"-m spotlighter.benchmark prepare --root {e.tmp / 'not-yet'}" in r.stdout and not e.calls()
    cmds = [l for l in r.stdout.splitlines() if " train.py " in l and not l.startswith("#")]
    assert len(cmds) == 4 + 4 + 3 + 3
    assert sum("--load-epoch 2" in c for c in cmds) == 6  # CoOp's xd and dg evaluations, epoch from its config


def test_demo_script_without_torch_says_what_comes_first(tmp_path):
    """A fresh machine: the script stops before the runner imports anything, naming what to install."""
    py = tmp_path / "python_without_torch"
    py.write_text("#!/bin/sh\nexit 1\n")
    py.chmod(0o755)
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "demo.sh")], capture_output=True, text=True,
                       env=dict(os.environ, RUNNER_PYTHON=str(py)), timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith(f"error: PyTorch is not installed for {py}. Install it first")


def test_a_folders_time_is_the_sum_of_its_runs_and_the_last_good_one(tmp_path):
    """elapsed_total adds every run log's elapsed line (a resumed training counts whole); elapsed_of is
    the newest run that exited 0; a log without its elapsed line (still running, killed) counts for none."""
    from spotlighter.run.jobs import elapsed_of, elapsed_total

    assert elapsed_total(str(tmp_path)) is None and elapsed_of(str(tmp_path)) is None
    logs = {"run-1.log": "cmd\n# elapsed 30.0 s, exit status 75\n", "run-2.log": "cmd\n# elapsed 12.5 s, exit status 0\n",
            "run-3.log": "cmd\nstill running\n"}
    for i, (name, text) in enumerate(logs.items()):
        (tmp_path / name).write_text(text)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert elapsed_total(str(tmp_path)) == 42.5
    assert elapsed_of(str(tmp_path)) == 12.5
