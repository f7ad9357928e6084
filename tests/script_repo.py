"""A throwaway repository for the protocol scripts (``env`` in conftest.py): the scripts, the
runner, minimal trainer configs, a ``$DATA`` with every dataset folder, and ``STUB``, a fake
interpreter whose ``train.py`` writes what the real trainer writes (checkpoints + ``checkpoint`` file,
log.txt with ``Finish training`` / ``=> result``, result.json)."""

import json
import os
import shutil
import subprocess
import sys

from spotlighter import data_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["base2new.sh", "xd.sh", "dg.sh", "fewshot.sh"]
CFGS = {"Spotlighter": "vit_b16_ep20_paper", "CoOp": "vit_b16_ep20_ctx4",
        "CoCoOp": "vit_b16_c4_ep10_batch1_ctxv1", "MaPLe": "vit_b16_c2_ep5_batch4_2ctx",
        "IVLP": "vit_b16_c2_ep20_batch4_4+4ctx", "PromptSRC": "vit_b16_c2_ep20_batch4_4+4ctx",
        "PromptKD": "vit_b16_c2_ep20_batch8_4+4ctx", "SpotlighterKD": "vit_b16_ep30_batch64_release",
        "ZeroshotCLIP": "vit_b16"}
#: The $DATA folder of every downloaded dataset (the generated ones are made on first use).
FOLDERS = {key: lay.folder for key, lay in data_layout.LAYOUTS.items() if lay.kind != "generated"}
XD = ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
      "sun397", "dtd", "eurosat", "ucf101"]

STUB = r'''#!{python}
"""Fake interpreter: `stub train.py ARGS` imitates the trainer; anything else runs real Python."""
import json, os, sys

argv = sys.argv[1:]
if os.environ.get("STUB_RESULTS") and argv[:2] == ["-m", "spotlighter.results"]:
    print("TABLE", " ".join(argv[2:]))
    sys.exit(0)
if argv[:2] == ["-m", "spotlighter.results"] and os.environ.get("STUB_NO_RESULTS"):
    print("No module named spotlighter.results", file=sys.stderr)
    sys.exit(1)
if not argv or argv[0] != "train.py":
    os.execv({python!r}, [{python!r}] + argv)

args, i, opts = {{}}, 1, []
while i < len(argv):
    a = argv[i]
    if a == "--eval-only":
        args[a] = True; i += 1
    elif a.startswith("--"):
        args[a] = argv[i + 1]; i += 2
    else:
        opts.append(a); i += 1
out = args["--output-dir"]
import time
start = time.time()
resumed = os.path.isfile(os.path.join(out, "prompt_learner", "checkpoint"))
time.sleep(float(os.environ.get("STUB_SLEEP", "0")))


def record():
    with open(os.environ["STUB_CALLS"], "a") as f:
        f.write(json.dumps({{"argv": argv, "cwd": os.getcwd(), "resumed": resumed, "start": start,
                            "end": time.time(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "omp": os.environ.get("OMP_NUM_THREADS")}}) + "\n")


import atexit
atexit.register(record)
os.makedirs(out, exist_ok=True)
log = os.path.join(out, "log.txt")
if os.path.exists(log):
    log = log + "-2024-01-01-00-00-00-%d" % len(os.listdir(out))
fail = os.environ.get("STUB_FAIL")
if fail and fail in out:
    open(log, "w").write("Traceback: boom\n")
    print("error: boom", file=sys.stderr)
    sys.exit(1)
seed = int(args["--seed"])
sub = opts[opts.index("DATASET.SUBSAMPLE_CLASSES") + 1] if "DATASET.SUBSAMPLE_CLASSES" in opts else "all"
acc = {{"base": 80.0, "new": 70.0}}.get(sub, 60.0) + seed
if "--eval-only" not in args:
    epochs = int(os.environ.get("STUB_EPOCHS", "2"))
    mod = os.path.join(out, "prompt_learner")
    os.makedirs(mod, exist_ok=True)
    cut = os.environ.get("STUB_INTERRUPT")
    last = 1 if (cut and cut in out and not os.path.exists(os.path.join(mod, "checkpoint"))) else epochs
    for e in range(1, last + 1):
        open(os.path.join(mod, "model.pth.tar-%d" % e), "w").write("x")
        open(os.path.join(mod, "checkpoint"), "w").write("model.pth.tar-%d\n" % e)
    if last < epochs:
        open(log, "w").write("epoch [1/%d]\n" % epochs)
        sys.exit(137)
    text = "Finish training\n"
else:
    text = ""
text += "=> result\n* total: 100\n* correct: %d\n* accuracy: %.1f%%\n" % (acc, acc)
open(log, "w").write(text)
json.dump({{"accuracy": acc, "correct": int(acc), "total": 100, "subset": sub, "seed": seed}},
          open(os.path.join(out, "result.json"), "w"), indent=2)
'''


def make_env(tmp_path):
    """A throwaway repository with the scripts, a $DATA with every dataset folder, and the stub."""
    repo = tmp_path / "repo"
    os.makedirs(repo / "scripts")
    for s in SCRIPTS:
        shutil.copy(os.path.join(ROOT, "scripts", s), repo / "scripts" / s)
    # the runner and the registry it reads (spotlighter/data_layout.py: $DATA folders, DATASETS.md sections)
    shutil.copytree(os.path.join(ROOT, "spotlighter"), repo / "spotlighter",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "configs", "datasets"), repo / "configs" / "datasets")
    from spotlighter import registry

    minibench = {t.name: t.minibench_config or CFGS[t.name] for t in registry.TRAINERS.values()}
    teachers: dict = {}  # the teachers' MiniBench configs (PromptSRC on the teacher-size CLIP)
    for t in registry.TRAINERS.values():
        if t.minibench_teacher_config:
            teachers.setdefault(registry.trainer(t.teacher[0]).name, set()).add(t.minibench_teacher_config)
    for trainer, cfg in CFGS.items():
        os.makedirs(repo / "configs" / "trainers" / trainer)
        for name in (cfg, minibench[trainer], *sorted(teachers.get(trainer, ()))):
            (repo / "configs" / "trainers" / trainer / f"{name}.yaml").write_text(
                "DATALOADER:\n  NUM_WORKERS: 0\nOPTIM:\n  NAME: \"sgd\"\n  MAX_EPOCH: 5\n")
    data = tmp_path / "data"
    for folder in FOLDERS.values():
        os.makedirs(data / folder)
    stub = tmp_path / "stub_python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    base = {k: v for k, v in os.environ.items()
            if k not in ("DATA", "SEEDS", "CFG", "OUTPUT", "PYTHON", "FORCE", "DRY_RUN", "DATASETS",
                         "SOURCE", "SHOTS")}
    base.update(DATA=str(data), STUB_CALLS=str(tmp_path / "calls.jsonl"), STUB_NO_RESULTS="1")

    class Env:
        pass

    e = Env()
    e.repo, e.data, e.stub, e.cwd, e.tmp = str(repo), str(data), str(stub), str(elsewhere), tmp_path
    e.out = os.path.join(str(repo), "output")

    def run(script, *args, **extra):
        environ = dict(base)
        environ.update({k: str(v) for k, v in extra.items() if v is not None})
        for k, v in extra.items():
            if v is None:
                environ.pop(k, None)
        return subprocess.run(["bash", os.path.join(e.repo, "scripts", script), *map(str, args)],
                              cwd=e.cwd, env=environ, capture_output=True, text=True, timeout=60)

    def calls():
        path = tmp_path / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    e.run, e.calls = run, calls
    return e
