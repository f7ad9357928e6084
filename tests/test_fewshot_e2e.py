"""scripts/fewshot.sh end to end with the real train.py through upstream Dassl, on a tiny
MiniBench-format dataset and the tiny CLIP: CoOp trained per shot count, zero-shot CLIP evaluated
once, the results tool's accuracy-vs-shots table read from what they wrote."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, requires_dassl
from tiny_data import make_tiny_minibench

pytestmark = requires_dassl


@pytest.fixture(scope="module")
def e2e_env(tmp_path_factory, tiny_clip_path):
    root = tmp_path_factory.mktemp("fewshot_e2e")
    data = root / "data"
    make_tiny_minibench(str(data))
    return {**os.environ, "DATA": str(data), "OUTPUT": str(root / "output"), "PYTHONUNBUFFERED": "1",
            "PYTHON": sys.executable, "SEEDS": "1", "OMP_NUM_THREADS": "1"}


def fast(clip):
    return ["INPUT.SIZE", "(32, 32)", "OPTIM.MAX_EPOCH", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
            "DATALOADER.NUM_WORKERS", "0", "MODEL.BACKBONE.PATH", clip]


def run(trainer, env, clip, **extra):
    return subprocess.run(["bash", "scripts/fewshot.sh", trainer, "minibench", *fast(clip)], cwd=ROOT,
                          env={**env, **extra}, capture_output=True, text=True, timeout=600)


def test_coop_and_zero_shot_curve(e2e_env, tiny_clip_path):
    zs = run("zsclip", e2e_env, tiny_clip_path)
    assert zs.returncode == 0, zs.stdout[-3000:] + zs.stderr[-2000:]
    coop = run("coop", e2e_env, tiny_clip_path, SHOTS="1 2")
    assert coop.returncode == 0, coop.stdout[-3000:] + coop.stderr[-2000:]
    top = os.path.join(e2e_env["OUTPUT"], "fewshot", "minibench")
    records = {}
    for name in ("ZeroshotCLIP/minibench_0shots", "CoOp/minibench_ep50_ctx16_1shots",
                 "CoOp/minibench_ep50_ctx16_2shots"):
        with open(os.path.join(top, name, "seed1", "result.json")) as f:
            records[name] = json.load(f)
    assert records["ZeroshotCLIP/minibench_0shots"]["shots"] is None
    assert [records[f"CoOp/minibench_ep50_ctx16_{k}shots"]["shots"] for k in (1, 2)] == [1, 2]
    assert {r["subset"] for r in records.values()} == {"all"} and {r["epoch"] for r in list(records.values())[1:]} == {1}
    # the end-of-run table: CoOp's rows 1 and 2 hold its accuracies
    rows = {line.split("|")[1].strip(): line for line in coop.stdout.splitlines() if line.startswith("| ")}
    for k in (1, 2):
        acc = records[f"CoOp/minibench_ep50_ctx16_{k}shots"]["accuracy"]
        assert f"{acc:.2f} (1)" in rows[str(k)]
    table = subprocess.run([sys.executable, "-m", "spotlighter.results", "fewshot", "--root", e2e_env["OUTPUT"],
                            "--dataset", "minibench"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    zs_acc = records["ZeroshotCLIP/minibench_0shots"]["accuracy"]
    assert table.stdout.count(f"{zs_acc:.2f} (1)") >= 5  # the zero-shot value in every row
