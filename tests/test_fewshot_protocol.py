"""scripts/fewshot.sh (CoOp's few-shot protocol) through the protocol runner, without Dassl: the exact
DRY_RUN commands and output tree, zero-shot CLIP's single evaluation, bad input, a stub run with skip
on re-run, and the SLURM dry run (``env`` fixture: tests/script_repo.py)."""

import os

import pytest

from spotlighter.output_tree import fewshot_seed_dir
from spotlighter.run.jobs import EVAL, TRAIN, Settings, build_graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = "vit_b16_ep20_ctx4"


def commands(stdout):
    return [line for line in stdout.splitlines() if " train.py " in line and not line.startswith("#")]


def test_dry_run_one_training_per_shots_and_seed(env):
    r = env.run("fewshot.sh", "coop", "dtd", "OPTIM.LR", "0.1", DRY_RUN=1, SEEDS="1 2", SHOTS="1 4")
    assert r.returncode == 0, r.stderr
    expected = []
    for shots in (1, 4):
        for seed in (1, 2):
            out = f"output/fewshot/dtd/CoOp/{CFG}_{shots}shots/seed{seed}"
            expected.append(" ".join([
                "python train.py --root", env.data, "--seed", str(seed), "--trainer CoOp",
                "--dataset-config-file configs/datasets/dtd.yaml",
                f"--config-file configs/trainers/CoOp/{CFG}.yaml", "--output-dir", out,
                "DATASET.NUM_SHOTS", str(shots), "DATASET.SUBSAMPLE_CLASSES all OPTIM.LR 0.1"]))
    assert commands(r.stdout) == expected
    assert (f"python -m spotlighter.results fewshot --root output --trainers CoOp --configs {CFG} --datasets dtd "
            "--seeds 1,2") in [line.replace("\\,", ",") for line in r.stdout.splitlines()]
    assert "# few-shot on dtd (all classes) | trainer CoOp" in r.stdout and "shots 1 4" in r.stdout
    assert not os.path.exists(env.out)


def test_default_shots_and_seeds_are_coops(env):
    r = env.run("fewshot.sh", "coop", "minibench", DRY_RUN=1)
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert len(cmds) == 15  # 1 2 4 8 16 shots x seeds 1 2 3
    shots = [c.split("DATASET.NUM_SHOTS ")[1].split()[0] for c in cmds]
    assert sorted(set(shots), key=int) == ["1", "2", "4", "8", "16"]
    assert all("--config-file configs/trainers/CoOp/minibench_ep50_ctx16.yaml" in c for c in cmds)  # MiniBench's


def test_zero_shot_is_one_evaluation(env):
    r = env.run("fewshot.sh", "zsclip", "dtd", DRY_RUN=1)
    assert r.returncode == 0, r.stderr
    (cmd,) = commands(r.stdout)
    assert cmd.endswith("--output-dir output/fewshot/dtd/ZeroshotCLIP/vit_b16_0shots/seed1 --eval-only "
                        "DATASET.SUBSAMPLE_CLASSES all")
    assert "DATASET.NUM_SHOTS" not in cmd
    assert "--seeds 1" in r.stdout.replace("\\,", ",").splitlines()[-1]


@pytest.mark.parametrize("args, extra, expect", [
    (["coop", "dtd"], {"SHOTS": "0 4"}, "SHOTS must be positive integers"),
    (["coop", "dtd"], {"SHOTS": "four"}, "SHOTS must be positive integers"),
    (["coop", "nowhere"], {}, "unknown dataset 'nowhere'. Valid datasets for few-shot"),
    (["promptkd", "dtd"], {}, "PromptKD distils on unlabelled images of every class"),
    (["coop"], {}, "usage: DATA=/path/to/datasets [SHOTS=\"1 2 4 8 16\"] scripts/fewshot.sh TRAINER DATASET"),
])
def test_bad_input(env, args, extra, expect):
    r = env.run("fewshot.sh", *args, DRY_RUN=1, **extra)
    assert r.returncode == 2
    assert expect in r.stderr and "Traceback" not in r.stderr


def test_stub_run_writes_the_tree_and_skips_on_rerun(env):
    r = env.run("fewshot.sh", "coop", "dtd", SEEDS="1 2", SHOTS="2 8", PYTHON=env.stub)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = env.calls()
    assert len(calls) == 4 and all("--eval-only" not in c["argv"] for c in calls)
    for shots in (2, 8):
        for seed in (1, 2):
            d = fewshot_seed_dir(env.repo + "/output", "dtd", "CoOp", CFG, shots, seed)
            assert os.path.isfile(os.path.join(d, "result.json")), d
    # plain summary (the stub has no results module): accuracy 60 + seed
    assert f"output/fewshot/dtd/CoOp/{CFG}_8shots/seed2: 62.00" in r.stdout
    r = env.run("fewshot.sh", "coop", "dtd", SEEDS="1 2", SHOTS="2 8", PYTHON=env.stub)
    assert r.returncode == 0 and len(env.calls()) == 4  # every job finished: nothing re-run
    assert r.stdout.count("skip (finished)") == 4


def test_slurm_dry_run_submits_every_job_then_the_table(env):
    r = env.run("fewshot.sh", "coop", "dtd", DRY_RUN=1, LAUNCHER="slurm", SEEDS="1", SHOTS="1 2")
    assert r.returncode == 0, r.stderr
    sbatch = [line for line in r.stdout.splitlines() if "sbatch --parsable" in line]
    assert len(sbatch) == 3 and "--dependency=afterany:$J000:$J001" in sbatch[-1]


def test_graph():
    s = Settings(protocol="fewshot", trainer="CoOp", trains=True, cfg="c", cfg_file="configs/trainers/CoOp/c.yaml",
                 shots=16, seeds=[1, 2], data="/data", output="output", python=["python"], extra=[], repo=ROOT,
                 ts="20260101-000000", dataset="dtd", shots_list=[1, 16])
    jobs = build_graph(s)
    assert [(j.kind, j.dir) for j in jobs] == [
        (TRAIN, f"output/fewshot/dtd/CoOp/c_{k}shots/seed{seed}") for k in (1, 16) for seed in (1, 2)]
    assert all(not j.deps and j.model_dir is None for j in jobs)  # tested at the end of its own training
    zs = build_graph(Settings(**{**s.__dict__, "trainer": "ZeroshotCLIP", "trains": False, "seeds": [3, 4]}))
    assert [(j.kind, j.seed, j.dir) for j in zs] == [(EVAL, 3, "output/fewshot/dtd/ZeroshotCLIP/c_0shots/seed3")]
