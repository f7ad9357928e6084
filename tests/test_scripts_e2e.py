"""The protocol scripts end to end with the real train.py through upstream Dassl, on a tiny
MiniBench-format dataset and the tiny CLIP: train, checkpoint, evaluate, table, safe re-run."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

import slurm_cluster
from conftest import ROOT, requires_dassl
from spotlighter import registry
from tiny_data import make_tiny_minibench

pytestmark = requires_dassl


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_clip_path):
    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    make_tiny_minibench(str(data))
    # PYTHON: the interpreter running the tests (not whatever `python` is first on PATH)
    return {**os.environ, "DATA": str(data), "OUTPUT": str(root / "output"), "PYTHONUNBUFFERED": "1",
            "PYTHON": sys.executable}


def fast(clip, extra=()):
    return ["INPUT.SIZE", "(32, 32)", "OPTIM.MAX_EPOCH", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
            "DATALOADER.NUM_WORKERS", "0", "MODEL.BACKBONE.PATH", clip, *extra]


def script(name, args, env, **extra_env):
    return subprocess.run(["bash", f"scripts/{name}", *args], cwd=ROOT, env={**env, **extra_env},
                          capture_output=True, text=True, timeout=600)


def result(path):
    with open(os.path.join(path, "result.json")) as f:
        return json.load(f)


def test_base2new_trains_evaluates_tabulates_and_skips_on_rerun(env, tiny_clip_path):
    args = ["spotlighter", "minibench", "4", *fast(tiny_clip_path, ["TRAINER.SPOTLIGHTER.IRM.HEADS", "1"])]
    proc = script("base2new.sh", args, env, SEEDS="1 2", CFG="minibench_ep10_paper")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    out = env["OUTPUT"]
    rel = "minibench/shots_4/Spotlighter/minibench_ep10_paper"
    for seed in (1, 2):
        base = result(f"{out}/base2new/train_base/{rel}/seed{seed}")
        new = result(f"{out}/base2new/test_new/{rel}/seed{seed}")
        assert (base["subset"], new["subset"], base["seed"], new["epoch"]) == ("base", "new", seed, 1)
        assert os.path.isfile(f"{out}/base2new/train_base/{rel}/seed{seed}/spotlighter/model.pth.tar-1")
    # the table of the results tool, with both seeds counted
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| minibench | Spotlighter"))
    assert "(2)" in row

    again = script("base2new.sh", args, env, SEEDS="1 2", CFG="minibench_ep10_paper")
    assert again.returncode == 0
    assert again.stdout.count("skip (finished)") == 4 and "Finish training" not in again.stdout


def test_xd_and_dg_evaluate_the_checkpoint_training_wrote(env, tiny_clip_path):
    common = dict(SEEDS="1", CFG="minibench_ep10_ctx4", SOURCE="minibench", DATASETS="minibench")
    proc = script("xd.sh", ["coop", "4", *fast(tiny_clip_path)], env, **common)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    out = env["OUTPUT"]
    src = f"{out}/minibench/CoOp/minibench_ep10_ctx4_4shots/seed1"
    assert result(src)["subset"] == "all" and result(src)["shots"] == 4
    # a model trained on another source than ImageNet never writes into ImageNet's evaluation tree
    target = result(f"{out}/evaluation_from_minibench/CoOp/minibench_ep10_ctx4_4shots/minibench/seed1")
    assert not os.path.exists(f"{out}/evaluation")
    assert target["epoch"] == 1 and target["shots"] is None and target["total"] == 72  # full test split, 24 x 3

    proc = script("dg.sh", ["coop", "4", *fast(tiny_clip_path)], env, **common)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "skip (finished)" in proc.stdout  # the same evaluation folder is already finished


def test_parallel_local_run_jobs_2(env, tiny_clip_path):
    """JOBS=2 on CPU through the real train.py: both seeds' trainings together, tests after them."""
    out = env["OUTPUT"] + "-jobs2"
    proc = script("base2new.sh", ["coop", "minibench", "4", *fast(tiny_clip_path)], env, SEEDS="1 2",
                  CFG="minibench_ep10_ctx4", OUTPUT=out, JOBS="2")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rel = "minibench/shots_4/CoOp/minibench_ep10_ctx4"
    for seed in (1, 2):
        tr, te = f"{out}/base2new/train_base/{rel}/seed{seed}", f"{out}/base2new/test_new/{rel}/seed{seed}"
        assert (result(tr)["subset"], result(te)["subset"], result(te)["epoch"]) == ("base", "new", 1)
        (ckpt,) = glob.glob(f"{tr}/*/model.pth.tar-1")
        assert os.path.getmtime(f"{te}/result.json") > os.path.getmtime(ckpt)  # tested after its training
    assert "progress: 4/4 finished, 0 running, 0 queued" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| minibench | CoOp"))
    assert "(2)" in row


def test_base2new_on_a_real_slurm_cluster(env, tiny_clip_path, slurm):
    """The tiny base-to-novel protocol end to end via sbatch: trainings, dependent tests, the table."""
    out = env["OUTPUT"] + "-slurm"
    proc = script("base2new.sh", ["coop", "minibench", "4", *fast(tiny_clip_path)], {**env, **slurm.env},
                  SEEDS="1 2", CFG="minibench_ep10_ctx4", OUTPUT=out, LAUNCHER="slurm")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    slurm_cluster.wait_idle(slurm, timeout=900)
    rel = "minibench/shots_4/CoOp/minibench_ep10_ctx4"
    for seed in (1, 2):
        assert result(f"{out}/base2new/test_new/{rel}/seed{seed}")["subset"] == "new"
    tables = glob.glob(f"{out}/slurm/*/table-*.out")
    assert len(tables) == 1
    row = next(line for line in open(tables[0]) if line.startswith("| minibench | CoOp"))
    assert "(2)" in row
    st = subprocess.run([sys.executable, "-m", "spotlighter.run", "status", "base2new", "coop", "minibench", "4",
                         *fast(tiny_clip_path)], cwd=ROOT, capture_output=True, text=True,
                        env={**env, **slurm.env, "OUTPUT": out, "SEEDS": "1 2", "CFG": "minibench_ep10_ctx4"})
    assert st.returncode == 0 and "4/4 done" in st.stdout, st.stdout + st.stderr


# ------------------------------------------------------------------------------------------------
# the fast launcher (jobs forked from a pre-imported server) against a fresh interpreter per job
# ------------------------------------------------------------------------------------------------
TIMING = [(re.compile(r"\btime \d+\.\d+ \(\d+\.\d+\) data \d+\.\d+ \(\d+\.\d+\)"), "time T data T"),
          (re.compile(r"\beta \d+:\d\d:\d\d"), "eta T"), (re.compile(r"Elapsed: \d+:\d\d:\d\d"), "Elapsed: T"),
          (re.compile(r"^# elapsed .* s, exit status"), "# elapsed T s, exit status")]
#: tqdm's evaluation bar: how often it redraws (and so how many lines it leaves) depends on the time
TQDM_BAR = re.compile(r"^\s*\d+%\|.*\| \d+/\d+ \[")


def normalised(path, root):
    with open(path) as f:
        text = f.read().replace(root, "ROOT")
    lines = []
    for line in text.splitlines():
        if TQDM_BAR.match(line):
            continue
        for pattern, repl in TIMING:
            line = pattern.sub(repl, line)
        lines.append(line)
    return lines


def test_fork_path_gives_the_subprocess_results_and_log_lines(tmp_path, tiny_clip_path):
    """The same job through the fork server and through `python train.py`: the same result.json,
    checkpoint tensors, per-batch losses and log lines (timings and the two roots aside)."""
    import torch

    args = ["spotlighter", "minibench", "4", *fast(tiny_clip_path, ["TRAINER.SPOTLIGHTER.IRM.HEADS", "1",
                                                                    "OPTIM.MAX_EPOCH", "2"])]
    rel = "base2new/{}/minibench/shots_4/Spotlighter/minibench_ep10_paper/seed1"
    runs = {}
    for mode in ("0", "1"):  # RUNNER_FORK=0: a fresh interpreter per job; 1: the fork server
        root = str(tmp_path / f"fork{mode}")
        make_tiny_minibench(os.path.join(root, "data"))  # each its own (same bytes) data and few-shot cache
        proc = script("base2new.sh", args, {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"},
                      DATA=os.path.join(root, "data"), OUTPUT=os.path.join(root, "out"), SEEDS="1",
                      CFG="minibench_ep10_paper", RUNNER_FORK=mode)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert ("jobs start from a fork server" in proc.stdout) == (mode == "1")
        runs[mode] = root
    a, b = runs["0"], runs["1"]
    for sub in ("train_base", "test_new"):
        da, db = (os.path.join(r, "out", rel.format(sub)) for r in (a, b))
        ra, rb = result(da), result(db)
        when = ("timestamp", "wall_time_s")  # when it ran and how long it took
        assert all(k in ra and k in rb for k in when)
        assert {k: v for k, v in ra.items() if k not in when} == \
            {k: (v.replace(b, a) if isinstance(v, str) else v) for k, v in rb.items() if k not in when}
        for name in ("log.txt", "run-*.log"):
            (la,), (lb,) = glob.glob(os.path.join(da, name)), glob.glob(os.path.join(db, name))
            assert normalised(la, a) == normalised(lb, b), name
    la = normalised(os.path.join(a, "out", rel.format("train_base"), "log.txt"), a)
    assert sum(" loss " in line for line in la) >= 2  # the per-batch losses are among the lines compared
    ca, cb = (torch.load(glob.glob(os.path.join(r, "out", rel.format("train_base"), "*", "model.pth.tar-2"))[0],
                         map_location="cpu", weights_only=False) for r in (a, b))
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"])


def test_demo_end_to_end_xd_then_dg_tiny(tmp_path, tiny_clip_path):
    """python -m spotlighter.run demo at tiny size (the data prepared here): CoOp trained on the
    source, evaluated on xd's and DG's targets from one graph, the two tables."""
    from spotlighter.benchmark.data import generate

    data = tmp_path / "data"
    make_tiny_minibench(str(data))
    for key in (*registry.XD_TARGETS["minibench"], *registry.DG_TARGETS["minibench"]):
        generate(str(data / key), key, train_per_class=1, val_per_class=1, test_per_class=2)
    out = tmp_path / "out"
    code = ("import sys; from spotlighter.run import demo, cli\n"
            "demo.prepare_command = lambda python, data: [*python, '-c', 'print(\"prepared (test)\")']\n"
            "sys.exit(cli.main(['demo', *sys.argv[1:]]))")
    proc = subprocess.run([sys.executable, "-c", code, *fast(tiny_clip_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT, "DATA": str(data), "OUTPUT": str(out),
                               "PYTHON": sys.executable, "SEEDS": "1", "DEMO_PROTOCOLS": "xd dg",
                               "DEMO_RUNS": "coop:minibench_ep10_ctx4", "SPOTLIGHTER_ALLOW_FEWER_SHOTS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "prepared (test)" in proc.stdout and "jobs start from a fork server" in proc.stdout
    assert "progress: 7/7 finished, 0 running, 0 queued" in proc.stdout
    src = out / "minibench" / "CoOp" / "minibench_ep10_ctx4_16shots" / "seed1"
    (ckpt,) = glob.glob(str(src / "*" / "model.pth.tar-1"))
    for key in registry.DG_TARGETS["minibench"]:
        d = out / "evaluation_from_minibench" / "CoOp" / "minibench_ep10_ctx4_16shots" / key / "seed1"
        assert result(str(d))["epoch"] == 1 and os.path.getmtime(d / "result.json") > os.path.getmtime(ckpt)
    for proto in ("xd", "dg"):
        assert (out / f"minibench_{proto}.csv").is_file()
        assert f"== {proto} done in " in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| minibench_sketch |"))
    assert "(1)" in row
