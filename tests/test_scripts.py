"""scripts/base2new.sh, xd.sh, dg.sh without Dassl and without trainers.

Each test copies scripts/ into a throwaway repository (with minimal trainer configs) and runs it
from another directory. ``DRY_RUN=1`` checks the exact train.py commands; real runs use
``PYTHON=<stub>``, a fake interpreter whose ``train.py`` writes what the real trainer writes
(checkpoints + ``checkpoint`` file, log.txt with ``Finish training`` / ``=> result``, result.json),
so skip / resume / FORCE / failure reporting are tested without training anything.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from script_repo import CFGS, SCRIPTS, XD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def commands(stdout):
    """The train.py command lines of a DRY_RUN output (comments and the cd dropped)."""
    return [line for line in stdout.splitlines() if " train.py " in line and not line.startswith("#")]


def coop_cmd(data, seed, dataset, out, *rest):
    return " ".join(["python train.py", "--root", data, "--seed", str(seed), "--trainer", "CoOp",
                     "--dataset-config-file", f"configs/datasets/{dataset}.yaml",
                     "--config-file", "configs/trainers/CoOp/vit_b16_ep20_ctx4.yaml",
                     "--output-dir", out, *rest])


# ------------------------------------------------------------------------------------------------
# DRY_RUN: exact commands
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("typed", ["coop", "CoOp", "COOP"])
def test_base2new_dry_run_exact_commands(env, typed):
    r = env.run("base2new.sh", typed, "dtd", 16, "OPTIM.LR", "0.1", DRY_RUN=1)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"cd {env.repo}" in lines
    rel = "dtd/shots_16/CoOp/vit_b16_ep20_ctx4"
    expected = []
    for s in (1, 2, 3):
        tr = f"output/base2new/train_base/{rel}/seed{s}"
        te = f"output/base2new/test_new/{rel}/seed{s}"
        expected.append(coop_cmd(env.data, s, "dtd", tr, "DATASET.NUM_SHOTS", "16",
                                 "DATASET.SUBSAMPLE_CLASSES", "base", "OPTIM.LR", "0.1"))
        expected.append(coop_cmd(env.data, s, "dtd", te, "--model-dir", tr, "--load-epoch", "5",
                                 "--eval-only", "DATASET.NUM_SHOTS", "16",
                                 "DATASET.SUBSAMPLE_CLASSES", "new", "OPTIM.LR", "0.1"))
    assert commands(r.stdout) == expected
    assert ("python -m spotlighter.results base2new --root output --trainers CoOp --configs vit_b16_ep20_ctx4 "
            "--datasets dtd --shots 16 --seeds 1,2,3") in [l.replace("\\,", ",") for l in lines]  # printf %q
    assert not os.path.exists(env.out)  # nothing created
    # every non-command line is a comment: the output is a runnable script
    assert all(l.startswith(("#", "cd ", "python ")) for l in lines)


def test_base2new_dry_run_env_overrides(env):
    os.makedirs(os.path.join(env.repo, "configs", "trainers", "Spotlighter"), exist_ok=True)
    open(os.path.join(env.repo, "configs", "trainers", "Spotlighter", "vit_b16_ep20_release.yaml"),
         "w").write("OPTIM:\n  MAX_EPOCH: 20\n")
    r = env.run("base2new.sh", "Spotlighter", "eurosat", 4, "OPTIM.MAX_EPOCH", "3", DRY_RUN=1,
                SEEDS="7 8", CFG="vit_b16_ep20_release", OUTPUT="myout", PYTHON="python3 -u")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert len(cmds) == 4
    out = os.path.join(env.cwd, "myout")  # relative OUTPUT: relative to where the script was called
    assert cmds[0].startswith("python3 -u train.py ")
    assert f"--output-dir {out}/base2new/train_base/eurosat/shots_4/Spotlighter/vit_b16_ep20_release/seed7" in cmds[0]
    assert "--config-file configs/trainers/Spotlighter/vit_b16_ep20_release.yaml" in cmds[0]
    assert "--load-epoch 3 " in cmds[1]  # OPTIM.MAX_EPOCH of the trailing options wins in a dry run
    assert "--seed 8" in cmds[3]


def test_base2new_zeroshot_is_eval_only(env):
    r = env.run("base2new.sh", "zsclip", "caltech101", 16, DRY_RUN=1, SEEDS="1")
    assert r.returncode == 0, r.stderr
    base, new = commands(r.stdout)
    rel = "caltech101/shots_16/ZeroshotCLIP/vit_b16/seed1"
    assert f"--output-dir output/base2new/train_base/{rel} --eval-only DATASET.NUM_SHOTS 16 DATASET.SUBSAMPLE_CLASSES base" in base
    assert f"--output-dir output/base2new/test_new/{rel} --eval-only DATASET.NUM_SHOTS 16 DATASET.SUBSAMPLE_CLASSES new" in new
    assert "--model-dir" not in base + new and "--trainer ZeroshotCLIP" in base


def test_dry_run_skip_force_and_epoch_from_checkpoint(env):
    rel = "dtd/shots_16/CoOp/vit_b16_ep20_ctx4"
    tr = os.path.join(env.out, "base2new", "train_base", rel, "seed1")
    os.makedirs(os.path.join(tr, "prompt_learner"))
    open(os.path.join(tr, "log.txt"), "w").write("...\nFinish training\n")
    open(os.path.join(tr, "result.json"), "w").write('{"accuracy": 81.0}')
    for e in (1, 2, 7):
        open(os.path.join(tr, "prompt_learner", f"model.pth.tar-{e}"), "w").write("x")
    open(os.path.join(tr, "prompt_learner", "checkpoint"), "w").write("model.pth.tar-7\n")
    r = env.run("base2new.sh", "coop", "dtd", 16, DRY_RUN=1, SEEDS="1")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert len(cmds) == 1 and "--load-epoch 7 " in cmds[0] and "test_new" in cmds[0]
    assert f"# skip (finished): output/base2new/train_base/{rel}/seed1" in r.stdout

    os.remove(os.path.join(tr, "prompt_learner", "checkpoint"))  # highest model.pth.tar-N instead
    open(os.path.join(tr, "prompt_learner", "model.pth.tar-9"), "w").write("x")
    r = env.run("base2new.sh", "coop", "dtd", 16, DRY_RUN=1, SEEDS="1")
    assert "--load-epoch 9 " in commands(r.stdout)[0]

    # TEST.FINAL_MODEL best_val deployed model-best.pth.tar at the end of training: evaluate that one
    open(os.path.join(tr, "prompt_learner", "model-best.pth.tar"), "w").write("x")
    r = env.run("base2new.sh", "coop", "dtd", 16, DRY_RUN=1, SEEDS="1")
    cmd = commands(r.stdout)[0]
    assert f"--model-dir output/base2new/train_base/{rel}/seed1 --eval-only" in cmd and "--load-epoch" not in cmd

    r = env.run("base2new.sh", "coop", "dtd", 16, DRY_RUN=1, SEEDS="1", FORCE=1)
    # moved OUTSIDE the seed's parent folder: CoOp's parse_test_res.py must not count it as a seed
    assert re.search(rf"^mv output/base2new/train_base/{rel}/seed1 output/backup/\d{{8}}-\d{{6}}/base2new/train_base/{rel}/seed1$",
                     r.stdout, re.M), r.stdout
    assert re.search(rf"^mkdir -p output/backup/\d{{8}}-\d{{6}}/base2new/train_base/{rel}$", r.stdout, re.M)
    assert "train_base" in commands(r.stdout)[0] and os.path.isdir(tr)  # dry run moves nothing


def test_xd_dry_run(env):
    r = env.run("xd.sh", "CoOp", 16, DRY_RUN=1, SEEDS="1")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    src = "output/imagenet/CoOp/vit_b16_ep20_ctx4_16shots/seed1"
    assert cmds[0] == coop_cmd(env.data, 1, "imagenet", src, "DATASET.NUM_SHOTS", "16")
    assert len(cmds) == 11
    for cmd, target in zip(cmds[1:], XD):
        assert cmd == coop_cmd(env.data, 1, target,
                               f"output/evaluation/CoOp/vit_b16_ep20_ctx4_16shots/{target}/seed1",
                               "--model-dir", src, "--load-epoch", "5", "--eval-only")
    assert ("python -m spotlighter.results xd --root output --trainers CoOp --configs vit_b16_ep20_ctx4 "
            "--shots 16 --seeds 1 --datasets " + ",".join(XD)) in r.stdout.replace("\\,", ",")

    r = env.run("xd.sh", "maple", 16, DRY_RUN=1, SEEDS="2", DATASETS="dtd eurosat")
    cmds = commands(r.stdout)
    assert len(cmds) == 3 and "--trainer MaPLe" in cmds[0] and cmds[2].split("--output-dir ")[1].startswith(
        "output/evaluation/MaPLe/vit_b16_c2_ep5_batch4_2ctx_16shots/eurosat/seed2")

    r = env.run("xd.sh", "zsclip", 16, DRY_RUN=1, SEEDS="1", DATASETS="dtd")
    src_cmd, dtd_cmd = commands(r.stdout)
    assert "--eval-only" in src_cmd and "--model-dir" not in dtd_cmd


def test_minibench_source_uses_its_registered_targets(env):
    """SOURCE=minibench: xd.sh and dg.sh default to MiniBench's generated targets (from
    spotlighter.registry), which need no folder under $DATA; a source without registered targets is an error naming the valid ones."""
    from spotlighter import registry

    r = env.run("xd.sh", "coop", 16, DRY_RUN=1, SEEDS="1", SOURCE="minibench")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert len(cmds) == 1 + len(registry.xd_targets("minibench"))
    assert "configs/datasets/minibench.yaml" in cmds[0]
    for cmd, target in zip(cmds[1:], registry.xd_targets("minibench")):
        assert f"configs/datasets/{target}.yaml" in cmd
        assert f"output/evaluation_from_minibench/CoOp/minibench_ep50_ctx16_16shots/{target}/seed1" in cmd
    r = env.run("dg.sh", "coop", 16, DRY_RUN=1, SEEDS="1", SOURCE="minibench")
    assert r.returncode == 0, r.stderr
    targets = [c.split("configs/datasets/")[1].split(".yaml")[0] for c in commands(r.stdout)]
    assert targets == list(registry.dg_targets("minibench"))
    r = env.run("dg.sh", "coop", 16, DRY_RUN=1, SEEDS="1", SOURCE="caltech101")
    assert r.returncode == 2 and "Valid datasets for SOURCE: imagenet minibench" in r.stderr


def test_dg_dry_run_and_missing_checkpoint(env):
    r = env.run("dg.sh", "coop", 16, SEEDS="1 2")
    assert r.returncode == 1
    assert "run scripts/xd.sh coop 16 first" in r.stderr
    assert "output/imagenet/CoOp/vit_b16_ep20_ctx4_16shots/seed1" in r.stderr
    assert not glob.glob(os.path.join(env.out, "evaluation", "*"))

    src = os.path.join(env.out, "imagenet", "CoOp", "vit_b16_ep20_ctx4_16shots", "seed1")
    os.makedirs(os.path.join(src, "prompt_learner"))
    open(os.path.join(src, "log.txt"), "w").write("Finish training\n")
    open(os.path.join(src, "result.json"), "w").write("{}")
    open(os.path.join(src, "prompt_learner", "model.pth.tar-2"), "w").write("x")
    open(os.path.join(src, "prompt_learner", "checkpoint"), "w").write("model.pth.tar-2\n")
    r = env.run("dg.sh", "coop", 16, DRY_RUN=1, SEEDS="1")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert [c.split("--dataset-config-file configs/datasets/")[1].split(".yaml")[0] for c in cmds] == \
        ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert all("--model-dir output/imagenet/CoOp/vit_b16_ep20_ctx4_16shots/seed1 --load-epoch 2 --eval-only" in c
               for c in cmds)
    assert ("python -m spotlighter.results dg --root output --trainers CoOp --configs vit_b16_ep20_ctx4 "
            "--shots 16 --seeds 1 --datasets imagenetv2,imagenet_sketch,imagenet_a,imagenet_r") in r.stdout.replace("\\,", ",")


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,args,extra,expect", [
    ("base2new.sh", ["foo", "dtd", 16], {}, "unknown trainer 'foo'. Valid trainers: spotlighter coop cocoop maple ivlp promptsrc promptkd spotlighterkd zsclip"),
    ("xd.sh", ["bar", 16], {}, "unknown trainer 'bar'"),
    ("base2new.sh", ["coop", "pets", 16], {}, "unknown dataset 'pets'. Valid datasets for base-to-novel: imagenet caltech101"),
    ("base2new.sh", ["coop", "imagenet_a", 16], {}, "unknown dataset 'imagenet_a'"),
    ("xd.sh", ["coop", 16], {"DATASETS": "dtd nope"}, "unknown dataset 'nope'"),
    ("base2new.sh", ["coop", "dtd", 16], {"DATA": None}, "DATA is not set: export DATA="),
    ("dg.sh", ["coop", 16], {"DATA": None}, "DATA is not set"),
    ("base2new.sh", ["coop", "dtd", 16], {"DATA": "/no/such/dir"}, "DATA=/no/such/dir does not exist"),
    ("base2new.sh", ["coop", "dtd", "x"], {}, "SHOTS must be a positive integer"),
    ("base2new.sh", ["coop", "dtd", 16, "OPTIM.LR"], {}, "KEY VALUE pairs"),
    ("base2new.sh", ["coop", "dtd", 16], {"SEEDS": "1 a"}, "SEEDS must be integers"),
    ("base2new.sh", ["coop", "dtd", 16], {"CFG": "nope"}, "configs/trainers/CoOp/nope.yaml does not exist. Set CFG to one of: minibench_ep50_ctx16 vit_b16_ep20_ctx4"),
    ("base2new.sh", ["coop"], {}, "usage:"),
])
def test_bad_input(env, script, args, extra, expect):
    r = env.run(script, *args, **extra)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expect in r.stderr


def test_missing_dataset_config(env):
    os.remove(os.path.join(env.repo, "configs", "datasets", "eurosat.yaml"))
    r = env.run("xd.sh", "coop", 16, DATASETS="dtd eurosat")
    assert r.returncode == 2 and not env.calls()
    assert "error: dataset config configs/datasets/eurosat.yaml does not exist" in r.stderr
    r = env.run("xd.sh", "coop", 16, DATASETS="dtd eurosat", DRY_RUN=1)
    assert r.returncode == 0 and "# warning: dataset config configs/datasets/eurosat.yaml does not exist" in r.stdout


def test_missing_dataset_folder(env):
    shutil.rmtree(os.path.join(env.data, "food-101"))
    shutil.rmtree(os.path.join(env.data, "dtd"))
    r = env.run("base2new.sh", "coop", "food101", 16)
    assert r.returncode == 2 and not env.calls()
    assert f"expected folder {env.data}/food-101 (see DATASETS.md#food101)" in r.stderr
    assert f"check everything with: python scripts/check_data.py --root {env.data} food101" in r.stderr
    # a dry run prints the commands before the datasets are downloaded, with a warning comment
    r = env.run("base2new.sh", "coop", "food101", 16, DRY_RUN=1)
    assert r.returncode == 0, r.stderr
    assert f"# warning: dataset 'food101' not found: expected folder {env.data}/food-101" in r.stdout
    assert len(commands(r.stdout)) == 6
    r = env.run("base2new.sh", "coop", "food101", 16, DRY_RUN=1, DATA="not/yet")
    assert r.returncode == 0 and f"--root {os.path.join(env.cwd, 'not/yet')} " in commands(r.stdout)[0]
    r = env.run("xd.sh", "coop", 16)  # every missing target is listed before anything runs
    assert r.returncode == 2 and "'food101'" in r.stderr and "'dtd'" in r.stderr and not env.calls()
    r = env.run("base2new.sh", "coop", "minibench", 16, DRY_RUN=1)  # generated on first use
    assert r.returncode == 0


# ------------------------------------------------------------------------------------------------
# real runs through the stub interpreter
# ------------------------------------------------------------------------------------------------
def test_base2new_run_skip_and_summary(env):
    r = env.run("base2new.sh", "coop", "dtd", 16, "OPTIM.LR", "0.1", SEEDS="1 2", PYTHON=env.stub)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = env.calls()
    assert len(calls) == 4 and all(c["cwd"] == env.repo for c in calls)
    assert calls[1]["argv"][calls[1]["argv"].index("--load-epoch") + 1] == "2"
    assert all(c["argv"][-2:] == ["OPTIM.LR", "0.1"] for c in calls)
    rel = "dtd/shots_16/CoOp/vit_b16_ep20_ctx4"
    for s in (1, 2):
        assert os.path.isfile(os.path.join(env.out, "base2new", "train_base", rel, f"seed{s}", "result.json"))
        assert os.path.isfile(os.path.join(env.out, "base2new", "test_new", rel, f"seed{s}", "result.json"))
    # plain summary (the results module is unavailable to the stub): means 81.5 / 71.5
    assert "results table unavailable" in r.stdout
    assert "Base 81.50  New 71.50  HM 76.17" in r.stdout

    r = env.run("base2new.sh", "coop", "dtd", 16, "OPTIM.LR", "0.1", SEEDS="1 2", PYTHON=env.stub)
    assert r.returncode == 0 and len(env.calls()) == 4  # nothing re-run
    assert r.stdout.count("skip (finished)") == 4

    # the same folders with other trailing options are not taken for finished: an error, nothing run
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1 2", PYTHON=env.stub)
    assert r.returncode == 1 and len(env.calls()) == 4
    assert "finished with other trailing options (OPTIM.LR 0.1) than now (none); FORCE=1 re-runs it" in r.stderr

    r = env.run("base2new.sh", "coop", "dtd", 16, "OPTIM.LR", "0.1", SEEDS="1 2", PYTHON=env.stub,
                STUB_RESULTS=1)
    assert ("TABLE base2new --root output --trainers CoOp --configs vit_b16_ep20_ctx4 --datasets dtd "
            "--shots 16 --seeds 1,2") in r.stdout
    assert "results table unavailable" not in r.stdout


def test_interrupted_training_resumes(env):
    rel = "dtd/shots_16/CoOp/vit_b16_ep20_ctx4"
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1 2", PYTHON=env.stub,
                STUB_INTERRUPT="train_base/" + rel + "/seed1", STUB_EPOCHS=3)
    assert r.returncode == 1
    assert "FAILED jobs:" in r.stderr
    tr1 = os.path.join("output", "base2new", "train_base", rel, "seed1")
    assert re.search(rf"train {re.escape(tr1)}: exit status 137; see {re.escape(tr1)}/run-[0-9-]+\.log", r.stderr)
    assert "its evaluation on new is not run" in r.stdout
    assert len(env.calls()) == 3  # seed1 train (killed), seed2 train + eval

    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1 2", PYTHON=env.stub, STUB_EPOCHS=3)
    assert r.returncode == 0, r.stderr
    assert "resume:" in r.stdout
    calls = env.calls()[3:]
    assert len(calls) == 2 and calls[0]["resumed"] is True
    assert calls[1]["argv"][calls[1]["argv"].index("--load-epoch") + 1] == "3"


def test_failed_eval_is_reported_and_other_seeds_continue(env):
    rel = "dtd/shots_16/CoOp/vit_b16_ep20_ctx4"
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1 2 3", PYTHON=env.stub,
                STUB_FAIL="test_new/" + rel + "/seed2")
    assert r.returncode == 1
    te2 = os.path.join("output", "base2new", "test_new", rel, "seed2")
    assert f"eval {te2}: exit status 1; see {te2}/run-" in r.stderr
    assert f"(Dassl log: {te2}/log.txt)" in r.stderr
    assert len(env.calls()) == 6  # seed 3 still ran
    assert "1 failed" in r.stdout


def test_force_moves_finished_results_aside(env):
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1", PYTHON=env.stub)
    assert r.returncode == 0
    rel = os.path.join(env.out, "base2new", "train_base", "dtd", "shots_16", "CoOp", "vit_b16_ep20_ctx4")
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1", PYTHON=env.stub, FORCE=1)
    assert r.returncode == 0, r.stderr
    assert len(env.calls()) == 4
    assert os.listdir(rel) == ["seed1"]  # nothing next to the seed folders
    backups = glob.glob(os.path.join(env.out, "backup", "*", "base2new", "train_base", "dtd", "shots_16", "CoOp",
                                     "vit_b16_ep20_ctx4", "seed1"))
    assert len(backups) == 1 and os.path.isfile(os.path.join(backups[0], "result.json"))
    assert os.path.isfile(os.path.join(rel, "seed1", "result.json"))
    assert "FORCE=1: moved the old output/base2new/train_base/dtd/shots_16/CoOp/vit_b16_ep20_ctx4/seed1 aside" in r.stdout


def test_train_exit_zero_without_result_is_a_failure(env, tmp_path):
    bad = tmp_path / "bad_python"
    bad.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(0)\n")
    bad.chmod(0o755)
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1", PYTHON=str(bad))
    assert r.returncode == 1 and "exited 0 but the folder lacks 'Finish training'" in r.stderr


def test_xd_then_dg_run(env):
    r = env.run("xd.sh", "coop", 4, SEEDS="1", DATASETS="dtd eurosat", PYTHON=env.stub)
    assert r.returncode == 0, r.stderr
    assert len(env.calls()) == 3
    ev = os.path.join(env.out, "evaluation", "CoOp", "vit_b16_ep20_ctx4_4shots")
    assert os.path.isfile(os.path.join(ev, "eurosat", "seed1", "result.json"))
    assert re.search(r"^eurosat\s+61\.00", r.stdout, re.M)  # plain summary

    r = env.run("dg.sh", "coop", 4, SEEDS="1", DATASETS="imagenet_a", PYTHON=env.stub)
    assert r.returncode == 0, r.stderr
    last = env.calls()[-1]["argv"]
    assert last[last.index("--model-dir") + 1] == "output/imagenet/CoOp/vit_b16_ep20_ctx4_4shots/seed1"
    assert os.path.isfile(os.path.join(ev, "imagenet_a", "seed1", "result.json"))

    r = env.run("xd.sh", "coop", 4, SEEDS="1", DATASETS="dtd eurosat", PYTHON=env.stub)
    assert r.returncode == 0 and len(env.calls()) == 4 and r.stdout.count("skip (finished)") == 3


def test_scripts_never_touch_cuda_visible_devices_and_parse():
    for s in SCRIPTS:
        text = open(os.path.join(ROOT, "scripts", s)).read()
        assert "CUDA_VISIBLE_DEVICES" not in text
        assert subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", s)]).returncode == 0
    for s in SCRIPTS[1:]:
        assert os.access(os.path.join(ROOT, "scripts", s), os.X_OK), s


def test_registry_default_configs_exist_and_match_the_runner():
    """Every trainer's default config in the registry is a file of configs/trainers/."""
    from spotlighter import registry

    assert {t.name: t.default_config for t in registry.TRAINERS.values()} == CFGS
    for t in registry.TRAINERS.values():
        assert os.path.isfile(os.path.join(ROOT, t.config_file())), t.name
        assert t.minibench_config is not None, f"{t.name} has no MiniBench config"
        assert os.path.isfile(os.path.join(ROOT, t.config_file(t.minibench_config))), t.name
        assert t.config_for("minibench") == t.config_for("minibench_glyphs") == t.minibench_config
        assert t.config_for("dtd") == t.config_for(None) == t.default_config
        if t.teacher is not None:  # the distilling trainers' teacher: on MiniBench the teacher-size CLIP's config
            teacher = registry.trainer(t.teacher[0])
            assert t.teacher_for("dtd") == t.teacher and t.teacher_for("minibench")[1] == t.minibench_teacher_config
            assert os.path.isfile(os.path.join(ROOT, teacher.config_file(t.minibench_teacher_config))), t.name
        else:
            assert t.teacher_for("minibench") is None


def test_minibench_runs_get_minibench_configs_without_cfg(env):
    """SOURCE=minibench xd.sh spotlighter without CFG runs the MiniBench config (not ViT-B/16's)."""
    r = env.run("xd.sh", "spotlighter", 16, SEEDS="1", SOURCE="minibench", DATASETS="", DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    (cmd,) = commands(r.stdout)
    assert "--config-file configs/trainers/Spotlighter/minibench_ep10_paper.yaml" in cmd
    r = env.run("base2new.sh", "spotlighter", "dtd", 16, SEEDS="1", DRY_RUN="1")
    assert all("vit_b16_ep20_paper.yaml" in c for c in commands(r.stdout))


def test_evaluations_of_a_retrained_model_are_redone(env):
    r = env.run("xd.sh", "coop", 4, SEEDS="1", DATASETS="dtd", PYTHON=env.stub)
    assert r.returncode == 0 and len(env.calls()) == 2
    src = os.path.join(env.out, "imagenet", "CoOp", "vit_b16_ep20_ctx4_4shots", "seed1")
    later = time.time() + 60
    for ckpt in glob.glob(os.path.join(src, "*", "model.pth.tar-*")):
        os.utime(ckpt, (later, later))  # the model was retrained after its evaluation
    r = env.run("xd.sh", "coop", 4, SEEDS="1", DATASETS="dtd", PYTHON=env.stub)
    assert r.returncode == 0 and len(env.calls()) == 3  # only the dtd evaluation is run again
    assert "is newer than" in r.stdout and "re-evaluating" in r.stdout
    ev = os.path.join(env.out, "evaluation", "CoOp", "vit_b16_ep20_ctx4_4shots", "dtd")
    assert os.listdir(ev) == ["seed1"]
    assert glob.glob(os.path.join(env.out, "backup", "*", "evaluation", "CoOp", "vit_b16_ep20_ctx4_4shots", "dtd",
                                  "seed1", "result.json"))  # the old result is kept aside
    assert os.path.isfile(os.path.join(ev, "seed1", "result.json"))


# ------------------------------------------------------------------------------------------------
# the runner: graph, locks, parallel local runs, refusals, unwritable output, status
# ------------------------------------------------------------------------------------------------
def settings(**kw):
    from spotlighter.run.jobs import Settings

    base = dict(protocol="base2new", trainer="CoOp", trains=True, cfg="c", cfg_file="configs/trainers/CoOp/c.yaml",
                shots=16, seeds=[1, 2], data="/data", output="output", python=["python"], extra=[], repo=ROOT,
                ts="20260101-000000", dataset="dtd")
    base.update(kw)
    return Settings(**base)


def test_graph_of_each_protocol():
    from spotlighter.run.jobs import build_graph

    jobs = build_graph(settings())
    assert [(j.kind, j.seed, j.what) for j in jobs] == [
        ("train", 1, "training on base"), ("eval", 1, "evaluation on new"),
        ("train", 2, "training on base"), ("eval", 2, "evaluation on new")]
    assert jobs[1].deps == [jobs[0].dir] and jobs[1].model_dir == jobs[0].dir and not jobs[0].deps

    xd = build_graph(settings(protocol="xd", dataset=None, source="imagenet", targets=["dtd", "eurosat"], seeds=[1]))
    assert [j.dataset for j in xd] == ["imagenet", "dtd", "eurosat"]
    assert all(j.deps == [xd[0].dir] and j.model_dir == xd[0].dir for j in xd[1:])
    assert xd[1].dir == "output/evaluation/CoOp/c_16shots/dtd/seed1"

    mb = build_graph(settings(protocol="xd", dataset=None, source="minibench", targets=["minibench"], seeds=[1]))
    assert mb[1].dir.startswith("output/evaluation_from_minibench/")  # never ImageNet's evaluation tree

    # zero-shot CLIP trains nothing: its first job of each seed is an evaluation, and says so
    zs = build_graph(settings(trainer="ZeroshotCLIP", trains=False, seeds=[1]))
    assert [(j.kind, j.what) for j in zs] == [("eval", "evaluation on base"), ("eval", "evaluation on new")]
    zs_xd = build_graph(settings(protocol="xd", trainer="ZeroshotCLIP", trains=False, dataset=None,
                                 source="imagenet", targets=["dtd"], seeds=[1]))
    assert [(j.kind, j.what) for j in zs_xd] == [("eval", "evaluation on imagenet"), ("eval", "evaluation on dtd")]

    dg = build_graph(settings(protocol="dg", dataset=None, source="imagenet", targets=["imagenet_a"], seeds=[3]))
    assert len(dg) == 1 and dg[0].needs_trained and not dg[0].deps  # trained by xd, not in this graph
    assert dg[0].model_dir == "output/imagenet/CoOp/c_16shots/seed3"

    zs = build_graph(settings(trainer="ZeroshotCLIP", trains=False, seeds=[1]))
    assert [j.kind for j in zs] == ["eval", "eval"] and zs[1].model_dir is None and "--eval-only" in zs[0].tail


def hold_lock(directory):
    """A separate process that holds the output lock of ``directory`` (as train.py does)."""
    code = ("import sys, time; from spotlighter.runlock import OutputLock\n"
            "lock = OutputLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, directory], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_folder_locked_by_a_live_process_is_shown_running_not_started_twice(env):
    rel = "dtd/shots_16/CoOp/vit_b16_ep20_ctx4"
    tr1 = os.path.join(env.out, "base2new", "train_base", rel, "seed1")
    holder = hold_lock(tr1)
    try:
        r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1 2", PYTHON=env.stub)
        assert r.returncode == 1, r.stdout + r.stderr
        calls = env.calls()
        assert len(calls) == 2 and all("seed2" in c["argv"][c["argv"].index("--output-dir") + 1] for c in calls)
        assert "RUNNING elsewhere (not started twice" in r.stderr
        assert f"is locked by pid {holder.pid} on " in r.stderr
        assert "seed 1: training on base is running elsewhere, so its evaluation on new is not run" in r.stdout
        assert "FAILED" not in r.stderr
        d = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1", DRY_RUN=1)
        assert f"# running elsewhere: output/base2new/train_base/{rel}/seed1 is locked by pid {holder.pid}" in d.stdout
        assert "train_base" not in "".join(commands(d.stdout))
        f = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1", PYTHON=env.stub, FORCE=1)
        assert f.returncode == 1 and os.path.isdir(tr1) and len(env.calls()) == 2  # FORCE never moves it
    finally:
        holder.kill()
        holder.wait()
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1 2", PYTHON=env.stub)  # the lock died with it
    assert r.returncode == 0, r.stderr
    assert len(env.calls()) == 4


def test_refused_training_is_reported_as_such_not_as_failed(env):
    assert env.run("base2new.sh", "coop", "dtd", 16, "OPTIM.LR", "0.1", SEEDS="1", PYTHON=env.stub).returncode == 0
    tn = os.path.join(env.out, "base2new", "test_new", "dtd", "shots_16", "CoOp", "vit_b16_ep20_ctx4", "seed1")
    shutil.rmtree(tn)
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1", PYTHON=env.stub)
    assert r.returncode == 1 and len(env.calls()) == 2
    assert "REFUSED jobs (finished with other trailing options):" in r.stderr
    assert "seed 1: training on base was finished with other trailing options, so its evaluation on new is not run" \
        in r.stdout
    assert "FAILED jobs" not in r.stderr and "0 failed, 1 refused, 1 not run" in r.stdout


def test_parallel_local_run_overlaps_jobs_and_tests_wait_for_their_training(env):
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1 2 3", PYTHON=env.stub, JOBS=2, STUB_SLEEP=1)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = env.calls()
    assert len(calls) == 6

    def span(sub, seed):
        c = next(c for c in calls if f"/{sub}/" in c["argv"][c["argv"].index("--output-dir") + 1]
                 and c["argv"][c["argv"].index("--seed") + 1] == str(seed))
        return c["start"], c["end"]

    for seed in (1, 2, 3):
        assert span("test_new", seed)[0] >= span("train_base", seed)[1]  # the test starts after its training
    starts = sorted(c["start"] for c in calls)
    ends = sorted(c["end"] for c in calls)
    assert starts[1] < ends[0]  # two jobs ran at the same time
    assert max(sum(1 for c in calls if c["start"] <= t < c["end"]) for t in starts) == 2  # never more than JOBS
    assert re.search(r"progress: \d/6 finished, \d running, \d queued; ETA \d+m\d\ds", r.stdout), r.stdout
    assert "progress: 6/6 finished, 0 running, 0 queued" in r.stdout
    assert "Finish training" not in r.stdout  # with JOBS > 1 job output goes to the run logs only
    assert all(c["cuda"] is None for c in calls)


def test_gpus_give_each_job_its_own_device(env):
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1 2", PYTHON=env.stub, GPUS="3 5", STUB_SLEEP=1,
                CUDA_VISIBLE_DEVICES=None)
    assert r.returncode == 0, r.stderr
    calls = env.calls()
    assert {c["cuda"] for c in calls} == {"3", "5"}
    for a in calls:
        for b in calls:
            if a is not b and a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["cuda"] != b["cuda"]  # jobs running together never share a device


def test_unwritable_output_is_one_clear_line(env, tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1", PYTHON=env.stub, OUTPUT=str(afile / "out"))
    assert r.returncode == 2 and not env.calls()
    assert r.stderr.strip().splitlines() == [f"error: cannot write to OUTPUT={afile}/out: Not a directory "
                                             "(choose another OUTPUT or free space)"]
    # a job folder that cannot be created: one FAILED line, no pointer to a log that does not exist
    tr = os.path.join(env.out, "base2new", "train_base", "dtd", "shots_16", "CoOp", "vit_b16_ep20_ctx4")
    os.makedirs(tr)
    open(os.path.join(tr, "seed1"), "w").write("not a folder")
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1", PYTHON=env.stub)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = next(l for l in r.stderr.splitlines() if "cannot write into" in l)
    assert "see " not in line and "train output/base2new/train_base/" in line


def test_status_from_the_tree(env):
    r = env.run("base2new.sh", "coop", "dtd", 16, SEEDS="1 2", PYTHON=env.stub,
                STUB_FAIL="test_new/dtd/shots_16/CoOp/vit_b16_ep20_ctx4/seed2")
    assert r.returncode == 1
    st = subprocess.run([sys.executable, "-m", "spotlighter.run", "status", "base2new", "coop", "dtd", "16"],
                        cwd=env.repo, env={**os.environ, "PYTHONPATH": env.repo, "DATA": env.data, "SEEDS": "1 2 3"},
                        capture_output=True, text=True)
    assert st.returncode == 1, st.stderr
    lines = st.stdout.splitlines()
    assert sum(l.startswith("done ") for l in lines) == 3
    failed = [l for l in lines if l.startswith("failed")]
    assert len(failed) == 1 and "test_new" in failed[0] and "/seed2/run-" in failed[0]
    assert sum(l.startswith("not started") for l in lines) == 2
    assert re.search(r"^3/6 done, 1 failed, 2 not started; ETA \d+m\d\ds", lines[-1], re.M), lines[-1]


def test_promptkd_base2new_is_transductive_with_the_teacher_trained_once(env):
    """promptkd: the student trains on all classes (unlabelled) and is evaluated on base and new; with
    TEACHER=train a PromptSRC teacher is trained once per dataset (seed 1, base classes) before every
    seed's student, which points TRAINER.PROMPTKD.TEACHER at it."""
    teacher_cfg = os.path.join(env.repo, "configs", "trainers", "PromptSRC", "vit_l14_c2_ep20_batch8_4+4ctx.yaml")
    with open(teacher_cfg, "w") as f:
        f.write("OPTIM:\n  MAX_EPOCH: 5\n")
    r = env.run("base2new.sh", "promptkd", "dtd", 16, SEEDS="1 2", DRY_RUN="1", TEACHER="train")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert len(cmds) == 1 + 2 * 3
    teacher = "output/teachers/dtd/PromptSRC/vit_l14_c2_ep20_batch8_4+4ctx_16shots/seed1"
    assert "--trainer PromptSRC" in cmds[0] and f"--output-dir {teacher}" in cmds[0]
    assert "DATASET.SUBSAMPLE_CLASSES base" in cmds[0]
    for i, seed in ((1, 1), (4, 2)):
        student = f"output/base2new/train_all/dtd/shots_16/PromptKD/vit_b16_c2_ep20_batch8_4+4ctx/seed{seed}"
        train, base, new = cmds[i:i + 3]
        assert f"--output-dir {student}" in train and "DATASET.SUBSAMPLE_CLASSES all" in train
        assert "--eval-only" not in train and f"TRAINER.PROMPTKD.TEACHER {teacher}" in train
        for cmd, subset, role in ((base, "base", "train_base"), (new, "new", "test_new")):
            assert "--eval-only" in cmd and f"--model-dir {student}" in cmd and f"SUBSAMPLE_CLASSES {subset}" in cmd
            assert f"output/base2new/{role}/dtd/" in cmd and f"TRAINER.PROMPTKD.TEACHER {teacher}" in cmd
    r = env.run("base2new.sh", "promptkd", "dtd", 16, SEEDS="1", DRY_RUN="1")
    assert r.returncode == 0 and len(commands(r.stdout)) == 3 and "teachers/" not in r.stdout
    r = env.run("base2new.sh", "coop", "dtd", 16, DRY_RUN="1", TEACHER="train")
    assert r.returncode == 2 and "CoOp distils from no teacher (only promptkd, spotlighterkd do)" in r.stderr
    r = env.run("base2new.sh", "promptkd", "dtd", 16, DRY_RUN="1", TEACHER="/x")
    assert r.returncode == 2 and "to use an existing teacher pass TRAINER.PROMPTKD.TEACHER PATH" in r.stderr
    # Spotlighter on PromptKD: the same graph, the same teacher folder (one teacher per dataset)
    r = env.run("base2new.sh", "spotlighterkd", "dtd", 16, SEEDS="1", DRY_RUN="1", TEACHER="train")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert len(cmds) == 4 and f"--output-dir {teacher}" in cmds[0]
    student = "output/base2new/train_all/dtd/shots_16/SpotlighterKD/vit_b16_ep30_batch64_release/seed1"
    assert f"--output-dir {student}" in cmds[1] and f"TRAINER.PROMPTKD.TEACHER {teacher}" in cmds[1]


def test_distilling_trainers_on_minibench_use_the_teacher_size_clip(env):
    """On MiniBench the teacher is PromptSRC's config on the teacher-size CLIP and the students run
    their MiniBench configs; TEACHER_CFG still picks another teacher config."""
    from spotlighter import registry

    for cli in ("promptkd", "spotlighterkd"):
        r = env.run("base2new.sh", cli, "minibench", 16, SEEDS="1", DRY_RUN="1", TEACHER="train")
        assert r.returncode == 0, r.stderr
        cmds = commands(r.stdout)
        teacher = f"output/teachers/minibench/PromptSRC/{registry.MINIBENCH_TEACHER_CONFIG}_16shots/seed1"
        assert len(cmds) == 4 and f"--output-dir {teacher}" in cmds[0]
        assert f"configs/trainers/PromptSRC/{registry.MINIBENCH_TEACHER_CONFIG}.yaml" in cmds[0]
        t = registry.trainer(cli)
        assert f"configs/trainers/{t.name}/{t.minibench_config}.yaml" in cmds[1]
        assert f"TRAINER.PROMPTKD.TEACHER {teacher}" in cmds[1]
    r = env.run("base2new.sh", "promptkd", "minibench", 16, SEEDS="1", DRY_RUN="1", TEACHER="train",
                TEACHER_CFG="nonexistent")
    assert r.returncode == 2 and "TEACHER_CFG=nonexistent" in r.stderr


def test_distilling_trainers_cross_dataset_per_target_and_dg_from_the_source(env):
    """xd: one teacher on the source; per target a student distilled on the target's whole unlabelled
    train split (NUM_SHOTS 0), then evaluated there. dg: the student distils on the source's train
    images in the same graph (never on a target's test images), then every target is evaluated."""
    with open(os.path.join(env.repo, "configs", "trainers", "PromptSRC", "vit_l14_c2_ep20_batch8_4+4ctx.yaml"), "w") as f:
        f.write("OPTIM:\n  MAX_EPOCH: 5\n")
    r = env.run("xd.sh", "promptkd", 16, DRY_RUN=1, SEEDS="1", DATASETS="dtd eurosat", TEACHER="train")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    teacher = "output/teachers/imagenet/PromptSRC/vit_l14_c2_ep20_batch8_4+4ctx_16shots/seed1"
    assert len(cmds) == 5 and f"--output-dir {teacher}" in cmds[0] and "SUBSAMPLE_CLASSES all" in cmds[0]
    for i, target in ((1, "dtd"), (3, "eurosat")):
        student = f"output/distilled/{target}/PromptKD/vit_b16_c2_ep20_batch8_4+4ctx_16shots/seed1"
        train, ev = cmds[i:i + 2]
        assert f"--output-dir {student}" in train and "--eval-only" not in train
        assert f"configs/datasets/{target}.yaml" in train and "DATASET.NUM_SHOTS 0" in train
        assert f"TRAINER.PROMPTKD.TEACHER {teacher}" in train and f"TRAINER.PROMPTKD.TEACHER {teacher}" in ev
        assert f"--model-dir {student}" in ev and f"output/evaluation/PromptKD/" in ev and f"/{target}/seed1" in ev
    r = env.run("dg.sh", "promptkd", 16, DRY_RUN=1, SEEDS="1", TEACHER="train")
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    source = "output/imagenet/PromptKD/vit_b16_c2_ep20_batch8_4+4ctx_16shots/seed1"
    assert f"--output-dir {teacher}" in cmds[0] and f"--output-dir {source}" in cmds[1]
    assert "configs/datasets/imagenet.yaml" in cmds[1] and "--eval-only" not in cmds[1]
    assert len(cmds) == 2 + 4 and all(f"--model-dir {source}" in c for c in cmds[2:])


def test_control_characters_in_paths_or_options_are_refused(env, tmp_path):
    """A newline in OUTPUT would start a command of its own in a DRY_RUN script."""
    evil = str(tmp_path / "out\ntouch /tmp/injected-by-output")
    r = env.run("base2new.sh", "coop", "dtd", 16, DRY_RUN=1, SEEDS="1", OUTPUT=evil)
    assert r.returncode == 2 and not env.calls() and r.stdout == ""
    assert r.stderr.strip() == (f"error: OUTPUT = {evil!r} contains the control character '\\n': paths, names "
                                "and options must be plain text")
    r = env.run("base2new.sh", "coop", "dtd", 16, "OPTIM.LR", "0.1\r", DRY_RUN=1, SEEDS="1")
    assert r.returncode == 2 and "argument 5 = '0.1\\r' contains the control character '\\r'" in r.stderr


def test_dry_run_messages_stay_comments(capsys):
    from spotlighter.run.protocol import ProtocolRun
    from spotlighter.run.jobs import Settings

    s = Settings(protocol="base2new", trainer="CoOp", trains=True, cfg="c", cfg_file="c.yaml", shots=1, seeds=[1],
                 data="/d", output="/o", python=["python"], extra=[], repo="/r", ts="t", dry_run=True)
    ProtocolRun(s).say("first line\nrm -rf /tmp/x\r\nlast")
    out = capsys.readouterr().out
    assert out.splitlines() == ["# first line", "# rm -rf /tmp/x", "# last"]
