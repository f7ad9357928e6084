"""LAUNCHER=slurm: submission (fake sbatch, always runs) and a real single-node SLURM cluster
(Debian's slurm-wlm + munge on localhost, started here; skipped with the reason where it cannot be).

The jobs run the stub interpreter of tests/script_repo.py, so the sbatch / dependency / table / status
path is exercised without Dassl; tests/test_scripts_e2e.py runs the real train.py on the cluster.
"""

import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest

import slurm_cluster

FAKE_SBATCH = r'''#!{python}
import json, os, sys
state = os.environ["FAKE_SLURM"]
n = len(open(state).read().splitlines()) if os.path.exists(state) else 0
with open(state, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
print(f"{{1000 + n}};cluster")
'''
FAKE_SQUEUE = r'''#!/bin/sh
# every job the fake sbatch handed out is still pending
[ -f "$FAKE_SLURM" ] || exit 0
n=$(wc -l < "$FAKE_SLURM"); i=0
while [ $i -lt $n ]; do echo "$((1000 + i)) PENDING"; i=$((i + 1)); done
'''


@pytest.fixture
def fake_slurm(env, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text(FAKE_SBATCH.format(python=sys.executable))
    (bindir / "squeue").write_text(FAKE_SQUEUE)
    for f in bindir.iterdir():
        f.chmod(0o755)
    state = tmp_path / "sbatch_calls.jsonl"

    def calls():
        return [json.loads(l) for l in state.read_text().splitlines()] if state.exists() else []

    path = f"{bindir}:{os.environ['PATH']}"
    return dict(PATH=path, FAKE_SLURM=str(state)), calls


def opt(argv, name):
    return [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]


def test_submission_dependencies_options_and_no_double_submission(env, fake_slurm, tmp_path):
    extra, calls = fake_slurm
    cfg = tmp_path / "slurm.cfg"
    cfg.write_text("# our cluster\naccount = vision\ntime = 02:00:00\nextra = --qos=normal --constraint=a100\n")
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1 2", PYTHON=env.stub, LAUNCHER="slurm",
                SLURM_CONFIG=str(cfg), SLURM_PARTITION="gpu", SLURM_GPUS_PER_JOB=1, SLURM_TIME="04:00:00", **extra)
    assert r.returncode == 0, r.stdout + r.stderr
    subs = calls()
    assert len(subs) == 5 and not env.calls()  # 2 x (train, eval) + the table; nothing ran here
    train1, eval1, train2, eval2, table = subs
    assert opt(eval1, "--dependency") == ["afterok:1000"] and "--kill-on-invalid-dep=yes" in eval1
    assert opt(eval2, "--dependency") == ["afterok:1002"] and not opt(train2, "--dependency")
    assert opt(table, "--dependency") == ["afterany:1000:1001:1002:1003"]
    for argv in (train1, eval1):
        assert opt(argv, "--partition") == ["gpu"] and opt(argv, "--gres") == ["gpu:1"]
        assert opt(argv, "--time") == ["04:00:00"]  # the environment wins over the file
        assert opt(argv, "--account") == ["vision"] and "--qos=normal" in argv and "--constraint=a100" in argv
        assert opt(argv, "--chdir") == [env.repo]
    assert not opt(table, "--gres") and opt(table, "--partition") == ["gpu"]
    script = open(train1[-1]).read()
    assert f"-m spotlighter.run job {train1[-1][:-3]}.json" in script
    spec = json.load(open(train1[-1][:-3] + ".json"))
    assert spec["job"]["dir"] == "output/base2new/train_base/dtd/shots_16/CoOp/vit_b16_ep20_ctx4/seed1"
    assert "python -m spotlighter.results base2new --root output" in open(table[-1]).read()
    assert "submitted train output/base2new/train_base/dtd/shots_16/CoOp/vit_b16_ep20_ctx4/seed1 as SLURM job 1000" \
        in r.stdout and "(after 1000)" in r.stdout

    # submitted again while those are queued: nothing is submitted twice, only a new table job
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1 2", PYTHON=env.stub, LAUNCHER="slurm", **extra)
    assert r.returncode == 0, r.stderr
    assert len(calls()) == 6 and r.stdout.count("already pending as SLURM job") == 4
    assert "submitted: 0 job(s), 4 already queued, 0 skipped as finished, 0 failed" in r.stdout
    assert "where they stand: python -m spotlighter.run status base2new coop dtd 16 (with the same" in r.stdout
    assert opt(calls()[-1], "--dependency") == ["afterany:1000:1001:1002:1003"]

    st = subprocess.run([sys.executable, "-m", "spotlighter.run", "status", "base2new", "coop", "dtd", "16"],
                        cwd=env.cwd, env={**os.environ, **extra, "PYTHONPATH": env.repo, "DATA": env.data,
                                          "SEEDS": "1 2", "OUTPUT": env.out},
                        capture_output=True, text=True)
    # OUTPUT given as the same folder, but absolute: other folder names -> nothing found in the ledger
    assert st.returncode == 1 and "0/4 done, 4 not started" in st.stdout


def test_dg_submitted_while_xd_training_is_queued_waits_for_it(env, fake_slurm):
    extra, calls = fake_slurm
    r = env.run("xd.sh", "coop", 16, SEEDS="1 2", DATASETS="", PYTHON=env.stub, LAUNCHER="slurm", **extra)
    assert r.returncode == 0, r.stdout + r.stderr
    train1, train2, _table = calls()
    assert "train-imagenet-seed1" in train1[-1] and "train-imagenet-seed2" in train2[-1]
    # dg.sh right away: the trainings are still pending, so its evaluations wait for them
    r = env.run("dg.sh", "coop", 16, SEEDS="1 2", PYTHON=env.stub, LAUNCHER="slurm", **extra)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "seed 1: imagenet training" in r.stdout and "is queued as SLURM job 1000" in r.stdout
    evals = [c for c in calls()[3:] if "--job-name=spl-table" not in c]
    assert len(evals) == 8 and not env.calls()  # 2 seeds x 4 ImageNet variants, nothing ran here
    for argv in evals:
        seed = "1000" if "seed1" in argv[-1] else "1001"
        assert opt(argv, "--dependency") == [f"afterok:{seed}"], argv
    # without a queued training dg still refuses, naming what to run (the local behaviour)
    r = env.run("dg.sh", "coop", 16, SEEDS="3", PYTHON=env.stub, LAUNCHER="slurm", **extra)
    assert r.returncode == 1 and "no finished imagenet checkpoint" in r.stderr


def test_bad_slurm_config_is_named(env, fake_slurm, tmp_path):
    extra, calls = fake_slurm
    cfg = tmp_path / "slurm.cfg"
    cfg.write_text("partition = gpu\ngpus = 2\n")
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1", PYTHON=env.stub, LAUNCHER="slurm",
                SLURM_CONFIG=str(cfg), **extra)
    assert r.returncode == 2 and not calls()
    assert f"error: {cfg}, line 2: expected 'key = value' with key one of partition, account, time" in r.stderr
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1", PYTHON=env.stub, LAUNCHER="pbs", **extra)
    assert r.returncode == 2 and "LAUNCHER must be one of local, slurm, got 'pbs'" in r.stderr


# ------------------------------------------------------------------------------------------------
# a real cluster
# ------------------------------------------------------------------------------------------------
def status(env, cluster, *args, **extra):
    return subprocess.run([sys.executable, "-m", "spotlighter.run", "status", *args], cwd=env.repo,
                          env={**cluster.env, "PYTHONPATH": env.repo, "DATA": env.data, **extra},
                          capture_output=True, text=True)


def test_protocol_on_a_real_cluster_with_dependencies_table_and_status(env, slurm):
    common = dict(SEEDS="1 2", PYTHON=env.stub, LAUNCHER="slurm", STUB_RESULTS=1, STUB_SLEEP=1,
                  SLURM_CONF=slurm.env["SLURM_CONF"])
    r = env.run("base2new.sh", "coop", "dtd", 16, **common)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("submitted ") == 5
    slurm_cluster.wait_idle(slurm)
    calls = env.calls()
    assert len(calls) == 4

    def call(sub, seed):
        return next(c for c in calls if f"/{sub}/" in c["argv"][c["argv"].index("--output-dir") + 1]
                    and c["argv"][c["argv"].index("--seed") + 1] == str(seed))

    for seed in (1, 2):
        assert call("test_new", seed)["start"] >= call("train_base", seed)["end"]  # afterok
        assert call("test_new", seed)["argv"][call("test_new", seed)["argv"].index("--load-epoch") + 1] == "2"
    table = glob.glob(os.path.join(env.out, "slurm", "*", "table-*.out"))
    assert len(table) == 1
    assert ("TABLE base2new --root output --trainers CoOp --configs vit_b16_ep20_ctx4 --datasets dtd --shots 16 "
            "--seeds 1,2") in open(table[0]).read()
    st = status(env, slurm, "base2new", "coop", "dtd", "16", SEEDS="1 2")
    assert st.returncode == 0, st.stdout + st.stderr
    assert "4/4 done" in st.stdout and re.search(r"^done\s+\d+\s+train output/base2new/train_base", st.stdout, re.M)

    # a failing training: its evaluation is cancelled (never queued forever), the table still comes
    r = env.run("base2new.sh", "coop", "eurosat", 16, **common,
                STUB_FAIL="train_base/eurosat/shots_16/CoOp/vit_b16_ep20_ctx4/seed2")
    assert r.returncode == 0, r.stderr
    slurm_cluster.wait_idle(slurm)
    st = status(env, slurm, "base2new", "coop", "eurosat", "16", SEEDS="1 2")
    assert st.returncode == 1
    failed = [l for l in st.stdout.splitlines() if l.startswith("failed")]
    assert len(failed) == 1 and "seed2" in failed[0] and "SLURM FAILED" in failed[0] and ".out" in failed[0]
    assert re.search(r"^not run .*test_new/eurosat/.*seed2", st.stdout, re.M)
    assert "2/4 done, 1 failed, 1 not run" in st.stdout
    assert len(glob.glob(os.path.join(env.out, "slurm", "*", "table-*.out"))) == 2
    if slurm.accounting:  # the controller reports to slurmdbd asynchronously
        ids = ",".join(json.loads(l)["id"] for l in open(os.path.join(env.out, "slurm", "jobs.jsonl")))
        deadline, sacct = time.monotonic() + 30, ""
        while time.monotonic() < deadline and "spl-eval-eurosat-s2|CANCELLED" not in sacct:
            time.sleep(1)
            sacct = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ids, "-o", "JobName,State"], env=slurm.env,
                                   capture_output=True, text=True).stdout
        assert "spl-train-eurosat-s2|FAILED" in sacct and "spl-eval-eurosat-s2|CANCELLED" in sacct, sacct


def test_preemption_options_defaults_and_overrides(env, fake_slurm, tmp_path):
    extra, calls = fake_slurm
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1", PYTHON=env.stub, LAUNCHER="slurm", **extra)
    assert r.returncode == 0, r.stdout + r.stderr
    train, evaluation, table = calls()
    for argv in (train, evaluation):  # the time-limit warning, requeue, and logs a requeued job appends to
        assert opt(argv, "--signal") == ["B:USR1@300"] and "--requeue" in argv
        assert opt(argv, "--open-mode") == ["append"]
    assert not opt(table, "--signal") and "--requeue" not in table

    cfg = tmp_path / "slurm.cfg"
    cfg.write_text("signal_margin = 600\nrequeue = no\n")
    r = env.run("base2new.sh", "coop", "eurosat", 16, SEEDS="1", PYTHON=env.stub, LAUNCHER="slurm",
                SLURM_CONFIG=str(cfg), SLURM_SIGNAL_MARGIN="120", **extra)
    assert r.returncode == 0, r.stdout + r.stderr
    train = calls()[3]
    assert opt(train, "--signal") == ["B:USR1@120"] and "--no-requeue" in train and "--requeue" not in train
    r = env.run("base2new.sh", "coop", "caltech101", 16, SEEDS="1", PYTHON=env.stub, LAUNCHER="slurm",
                SLURM_SIGNAL_MARGIN="0", SLURM_REQUEUE="0", **extra)
    assert r.returncode == 0 and not opt(calls()[-3], "--signal") and "--no-requeue" in calls()[-3]

    for var, value, message in (("SLURM_SIGNAL_MARGIN", "5min", "SLURM_SIGNAL_MARGIN must be a number of seconds "
                                                                  "(e.g. 300; 0 for no signal), got '5min'"),
                                ("SLURM_REQUEUE", "maybe", "SLURM_REQUEUE must be yes or no, got 'maybe'")):
        n = len(calls())
        r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1", PYTHON=env.stub, LAUNCHER="slurm", FORCE=1,
                    **{var: value}, **extra)
        assert r.returncode == 2 and r.stderr.strip() == f"error: {message}" and len(calls()) == n


def test_slurm_dry_run_prints_the_submission_as_a_runnable_script(env, fake_slurm):
    extra, calls = fake_slurm
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1 2", PYTHON=env.stub, LAUNCHER="slurm", DRY_RUN=1,
                **extra)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not calls() and not env.calls() and not os.path.exists(os.path.join(env.out, "slurm"))
    lines = r.stdout.splitlines()
    subs = [line for line in lines if "=$(sbatch " in line]
    assert [s.split("=", 1)[0] for s in subs] == ["J000", "J001", "J002", "J003", "TABLE"]
    assert '"--dependency=afterok:$J000" --kill-on-invalid-dep=yes' in subs[1]
    assert '"--dependency=afterok:$J002"' in subs[3] and "--dependency" not in subs[2]
    assert '"--dependency=afterany:$J000:$J001:$J002:$J003"' in subs[4]
    assert "--signal=B:USR1@300 --requeue" in subs[0] and "--signal" not in subs[4]

    # the script runs as it stands: it writes the job files and submits with the ids sbatch returned
    script = "\n".join(line for line in lines if not line.startswith("cd "))
    run = subprocess.run(["bash", "-e"], input=script, env={**os.environ, **extra}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    submitted = calls()
    assert len(submitted) == 5 and opt(submitted[1], "--dependency") == ["afterok:1000"]
    assert opt(submitted[4], "--dependency") == ["afterany:1000:1001:1002:1003"]
    spec = json.load(open(submitted[0][-1][:-3] + ".json"))
    assert spec["job"]["dir"].endswith("train_base/dtd/shots_16/CoOp/vit_b16_ep20_ctx4/seed1")
    assert spec["settings"]["dry_run"] is False


def test_a_state_accounting_has_not_caught_up_with_is_asked_of_the_controller(tmp_path, monkeypatch):
    """Right after a job ends, sacct can still say RUNNING (slurmdbd is updated asynchronously): the
    controller's final state wins; sacct's stale one is kept only for jobs the controller forgot."""
    from spotlighter.run import slurm as slurm_mod

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sacct").write_text("#!/bin/sh\nprintf '1001|RUNNING\\n1002|COMPLETED\\n1003|PENDING\\n'\n")
    (bindir / "scontrol").write_text("#!/bin/sh\n[ \"$4\" = 1001 ] && echo 'JobId=1001 JobState=FAILED Reason=x'\n"
                                     "exit 0\n")
    for tool in ("sacct", "scontrol"):
        (bindir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    assert slurm_mod.finished_states(["1001", "1002", "1003"]) == {"1001": "FAILED", "1002": "COMPLETED",
                                                                   "1003": "PENDING"}
