"""Preemption on a real single-node SLURM cluster (tests/slurm_cluster.py) with the real train.py:
the time-limit warning (``--signal=B:USR1@<margin>``, sent here at once with ``scancel --signal=USR1
--batch``) reaches the training, which checkpoints and exits 75; the job requeues itself, resumes,
and its result equals an uninterrupted run's; the evaluation that depends on it and the table run
without a manual resubmit."""

import glob
import json
import os
import shlex
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, requires_dassl
from tiny_data import make_tiny_minibench

pytestmark = requires_dassl

#: The training sleeps this long after every step, so the signal lands inside it (24 steps).
STEP_SLEEP_S = "0.4"
FAST = ["INPUT.SIZE", "(32, 32)", "OPTIM.MAX_EPOCH", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
        "DATALOADER.NUM_WORKERS", "0"]


def _squeue(c):
    r = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], env=c.env, capture_output=True, text=True)
    return [line.split() for line in r.stdout.splitlines()]


def _wait(what, ok, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_signalled_job_checkpoints_requeues_resumes_and_equals_an_uninterrupted_run(slurm, tmp_path,
                                                                                     tiny_clip_path):
    data, out = tmp_path / "data", tmp_path / "output"
    make_tiny_minibench(str(data))
    env = {**slurm.env, "DATA": str(data), "OUTPUT": str(out), "SEEDS": "1", "CFG": "minibench_ep10_ctx4",
           "PYTHON": sys.executable, "LAUNCHER": "slurm", "PYTHONUNBUFFERED": "1",
           "SPOTLIGHTER_TEST_STEP_SLEEP": STEP_SLEEP_S}
    r = subprocess.run(["bash", "scripts/base2new.sh", "coop", "minibench", "4", *FAST, "MODEL.BACKBONE.PATH",
                        tiny_clip_path], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    ledger = [json.loads(line) for line in open(out / "slurm" / "jobs.jsonl")]
    train = next(e for e in ledger if e["kind"] == "train")
    jid, train_dir = train["id"], train["dir"]
    script = glob.glob(str(out / "slurm" / "*" / "000-train-minibench-seed1.sh"))[0]
    assert "exec " in open(script).read()  # the batch shell becomes the runner: B:USR1 reaches it

    # the warning SLURM sends <margin> s before the time limit, now: to the batch shell only (B:)
    _wait("the first epoch lines", lambda: os.path.exists(train["log"])
          and "epoch [1/2] batch [5/12]" in open(train["log"]).read())
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], env=slurm.env, check=True)
    # requeued, it may start again when its old credential expires (slurm_cluster.CRED_EXPIRE_S)
    _wait("every job to finish", lambda: not _squeue(slurm), timeout=600)

    log = open(train["log"]).read()  # --open-mode=append: both runs of the job
    assert "stopped: by SIGUSR1 after batch" in log and f"requeueing SLURM job {jid} (scontrol requeue)" in log
    assert "Resumed from" in log and "-step" in log and "Finish training" in log
    stop = log.index("stopped: by SIGUSR1")
    assert "epoch [2/2]" in log[log.index("Resumed from"):] and log.index("Resumed from") > stop

    # the same command without the signal, into another folder: the same model and the same result
    runlog = sorted(glob.glob(os.path.join(train_dir, "run-*.log")))[0]
    cmd = shlex.split(open(runlog).readline())
    ref = tmp_path / "uninterrupted"
    cmd[cmd.index("--output-dir") + 1] = str(ref)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if not k.startswith("SPOTLIGHTER_TEST")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = torch.load(ref / "prompt_learner" / "model.pth.tar-2", weights_only=True)
    b = torch.load(os.path.join(train_dir, "prompt_learner", "model.pth.tar-2"), weights_only=True)
    assert torch.equal(a["state_dict"]["prompt_learner.ctx"], b["state_dict"]["prompt_learner.ctx"])
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(),
                                                  b["optimizer"]["state"][0].values()))
    ra = json.load(open(ref / "result.json"))
    rb = json.load(open(os.path.join(train_dir, "result.json")))
    assert (ra["correct"], ra["macro_f1"], ra["epoch"]) == (rb["correct"], rb["macro_f1"], rb["epoch"])

    # the evaluation (afterok on the training) and the table ran without a resubmit
    evaluation = next(e for e in ledger if e["kind"] == "eval")
    assert json.load(open(os.path.join(evaluation["dir"], "result.json")))["subset"] == "new"
    (table,) = glob.glob(str(out / "slurm" / "*" / "table-*.out"))
    assert any(line.startswith("| minibench | CoOp") for line in open(table))

    if slurm.accounting:  # every job of this (private) slurm, each run of a requeued one on its own line
        deadline, sacct = time.monotonic() + 30, ""
        while time.monotonic() < deadline and sacct.count("COMPLETED") < 3:
            time.sleep(1)
            sacct = subprocess.run(["sacct", "-D", "-X", "-o", "JobID,JobName%22,State,ExitCode,Start,End,Elapsed"],
                                   env=slurm.env, capture_output=True, text=True).stdout
        print("\n" + sacct)
        rows = [line.split() for line in sacct.splitlines()[2:]]
        assert [r[2] for r in rows if r[0] == jid] == ["REQUEUED", "COMPLETED"], sacct
        assert [r[2] for r in rows if r[1] in ("spl-eval-minibench-s1", "spl-table")] == ["COMPLETED"] * 2, sacct
