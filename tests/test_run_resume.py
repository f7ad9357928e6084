"""The runner's side of resumes and stops (spotlighter/run/jobs.py, slurm.py): a job stopped by a
signal (train.py exit status 75), a resume with other trailing options, what run-options.txt says,
stop signals passed on to the job, and the SLURM job requeueing itself. A fake interpreter stands
for train.py (no torch)."""

import os
import signal
import sys
import threading
import time

import pytest

from spotlighter import preempt
from spotlighter.run import jobs as jobs_mod
from spotlighter.run.jobs import EVAL, OPTIONS_FILE, TRAIN, Job, Settings, inspect, run_one
from spotlighter.run.slurm import requeue_self

FAKE = r'''#!{python}
import os, signal, sys, time
args = sys.argv[2:]
out = args[args.index("--output-dir") + 1]
os.makedirs(os.path.join(out, "prompt_learner"), exist_ok=True)
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(" ".join(args) + "\n")
mode = os.environ["FAKE_MODE"]
if mode == "wait":  # like train.py: a stop signal ends the step, a checkpoint is written, exit 75
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    open(os.path.join(out, "ready"), "w").close()
    while not got:
        time.sleep(0.05)
    mode = "stop"
if mode == "stop":
    open(os.path.join(out, "prompt_learner", "model.pth.tar-1-step3"), "w").close()
    print("stopped: by SIGUSR1 after batch 3/12 of epoch 1", file=sys.stderr)
    sys.exit(75)
if mode == "eval":  # an evaluation: a USR1 would kill it (default action); it must never get one
    open(os.path.join(out, "ready"), "w").close()
    time.sleep(1.5)
    open(os.path.join(out, "result.json"), "w").write("{{}}")
    sys.exit(0)
if mode == "refuse":
    print("error: ... holds a run with other settings", file=sys.stderr)
    sys.exit(2)
open(os.path.join(out, "prompt_learner", "model.pth.tar-2"), "w").close()
open(os.path.join(out, "log.txt"), "w").write("Finish training\n")
open(os.path.join(out, "result.json"), "w").write("{{}}")
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    path = tmp_path / "python"
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(0o755)
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("FAKE_CALLS", str(calls))

    def settings(extra):
        return Settings(protocol="base2new", trainer="CoOp", trains=True, cfg="c", cfg_file="c.yaml", shots=4,
                        seeds=[1], data=str(tmp_path), output=str(tmp_path / "out"), python=[str(path)],
                        extra=list(extra), repo=str(tmp_path), ts="20260101-000000", dataset="dtd")

    job = Job(TRAIN, str(tmp_path / "out" / "seed1"), ["--output-dir", str(tmp_path / "out" / "seed1")], [], 1,
              "dtd", "training on base")

    def ncalls():
        return len(calls.read_text().splitlines()) if calls.exists() else 0
    return settings, job, ncalls


def options(job):
    with open(os.path.join(job.dir, OPTIONS_FILE)) as f:
        return f.read().strip()


def test_stopped_changed_and_what_run_options_records(fake, monkeypatch, capsys):
    settings, job, ncalls = fake
    say = lambda msg: None  # noqa: E731
    monkeypatch.setenv("FAKE_MODE", "stop")
    out = run_one(job, settings(["OPTIM.LR", "0.1"]), say, echo=False)
    assert out.status == "stopped" and out.ran and options(job) == "OPTIM.LR 0.1"
    assert out.message.startswith(f"train {job.dir}: stopped with a resumable checkpoint; re-running resumes it "
                                  f"(see {job.dir}/run-20260101-000000.log)")

    # other trailing options than the interrupted run's: refused before anything runs
    st = inspect(job, settings([]))
    assert st.name == "changed" and st.note == (
        f"{job.dir} holds an interrupted training with other trailing options (OPTIM.LR 0.1) than now (none): "
        f"resuming it would mix two runs; FORCE=1 starts it over (the old folder is moved to "
        f"{settings([]).output}/backup/), or use another OUTPUT")
    out = run_one(job, settings([]), say, echo=False)
    assert out.status == "changed" and ncalls() == 1 and options(job) == "OPTIM.LR 0.1"

    # a resume train.py refuses (its checkpoint's settings differ) leaves the record alone
    os.remove(os.path.join(job.dir, OPTIONS_FILE))
    monkeypatch.setenv("FAKE_MODE", "refuse")
    out = run_one(job, settings(["OPTIM.LR", "0.2"]), say, echo=False)
    assert out.status == "failed" and ncalls() == 2 and not os.path.exists(os.path.join(job.dir, OPTIONS_FILE))

    # a resume that finishes records what it ran with
    monkeypatch.setenv("FAKE_MODE", "finish")
    out = run_one(job, settings(["OPTIM.LR", "0.1"]), say, echo=False)
    assert out.status == "done" and options(job) == "OPTIM.LR 0.1"
    assert inspect(job, settings(["OPTIM.LR", "0.1"])).name == "finished"


def test_stop_signals_reach_the_job(fake, monkeypatch):
    settings, job, _ = fake
    monkeypatch.setenv("FAKE_MODE", "wait")
    ready = os.path.join(job.dir, "ready")

    def signal_runner():
        deadline = time.monotonic() + 30
        while not os.path.exists(ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM's --signal=B:USR1 does to the batch shell

    before = signal.getsignal(signal.SIGUSR1)
    threading.Thread(target=signal_runner, daemon=True).start()
    out = run_one(job, settings([]), lambda msg: None, echo=False, forward_signals=True)
    assert out.status == "stopped" and out.stop_signal == signal.SIGUSR1
    assert "stopped by SIGUSR1 with a resumable checkpoint" in out.message
    assert signal.getsignal(signal.SIGUSR1) == before  # restored


def test_an_evaluation_runs_on_after_the_time_limit_warning(fake, monkeypatch):
    settings, job, _ = fake
    job.kind = EVAL
    monkeypatch.setenv("FAKE_MODE", "eval")
    ready = os.path.join(job.dir, "ready")

    def signal_runner():
        while not os.path.exists(ready):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=signal_runner, daemon=True).start()
    out = run_one(job, settings([]), lambda msg: None, echo=False, forward_signals=True)
    assert out.status == "done", out.message


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_requeue_only_after_the_time_limit_warning(sig, requeued, tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "scontrol.txt"
    (bindir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    (bindir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    said = []
    requeue_self(jobs_mod.Outcome("stopped", "", stop_signal=sig), said.append)
    if requeued:
        assert log.read_text().split() == ["requeue", "42"]
        assert said == ["requeueing SLURM job 42 (scontrol requeue): it resumes from the checkpoint when it "
                        "runs again"]
    else:
        assert not log.exists()
        assert said == ["not requeued: stopped by SIGTERM (preemption, scancel or the time limit: a job submitted "
                        "with --requeue is requeued by SLURM when it is preempted); re-submitting resumes it"]
    assert preempt.EXIT_RESUMABLE == 75
