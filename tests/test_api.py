"""The Python API (spotlighter.create_model / load_trained) on a tiny trained run, with and without
Dassl; the README's example run as written; the TensorBoard scalars a training writes."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

import spotlighter
from conftest import ROOT, requires_dassl
from spotlighter import checkpoint as ckpt
from spotlighter.config import ConfigError, trainer_cfg
from tiny_data import BASE_CLASSNAMES, make_tiny_minibench

pytestmark = pytest.mark.usefixtures("one_torch_thread")
#: 32 px (16 patches), 2 epochs of 4 shots: seconds on a CPU
FAST = ["INPUT.SIZE", "(32, 32)", "OPTIM.MAX_EPOCH", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
        "DATALOADER.TEST.BATCH_SIZE", "8", "DATALOADER.NUM_WORKERS", "0", "DATASET.NUM_SHOTS", "4",
        "TRAINER.SPOTLIGHTER.IRM.HEADS", "1", "DATASET.SUBSAMPLE_CLASSES", "base"]
#: Python with ``import dassl`` failing, as on a machine without Dassl
NO_DASSL = "import sys; sys.modules['dassl'] = None\n"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_tiny_minibench(str(root))
    return str(root)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root, tiny_clip_path):
    """A tiny Spotlighter run of train.py (base classes), as a user's output folder."""
    out = tmp_path_factory.mktemp("out") / "seed1"
    cmd = [sys.executable, "train.py", "--root", data_root, "--seed", "1", "--trainer", "Spotlighter",
           "--dataset-config-file", "configs/datasets/minibench.yaml",
           "--config-file", "configs/trainers/Spotlighter/vit_b16_ep20_paper.yaml", "--output-dir", str(out),
           *FAST, "MODEL.BACKBONE.PATH", tiny_clip_path]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return str(out)


def base_test_split(data_root):
    folder = os.path.join(data_root, "minibench")
    with open(os.path.join(folder, "split_zhou_MiniBench.json")) as f:
        test = json.load(f)["test"]
    return [(os.path.join(folder, "images", p), y) for p, y, _ in test if y < len(BASE_CLASSNAMES)]


def run_python(code, cwd=ROOT, no_dassl=False):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", (NO_DASSL if no_dassl else "") + code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


# ------------------------------------------------------------------------------------------------
@requires_dassl
def test_load_trained_reproduces_the_runs_test_accuracy(trained, data_root):
    assert os.path.isfile(os.path.join(trained, "config.yaml"))  # written by the training
    model = spotlighter.load_trained(trained, BASE_CLASSNAMES)
    assert isinstance(model, torch.nn.Module) and type(model.model).__name__ == "Spotlighter"
    items = base_test_split(data_root)
    x = torch.stack([model.preprocess(path) for path, _ in items])
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (len(items), len(BASE_CLASSNAMES)) and logits.dtype == torch.float32
    correct = sum(int(p == y) for p, (_, y) in zip(logits.argmax(dim=1).tolist(), items))
    with open(os.path.join(trained, "result.json")) as f:
        record = json.load(f)
    assert (correct, len(items)) == (record["correct"], record["total"])  # what train.py's test counted
    # the trained state is what the checkpoint holds, the prototypes mapped by class name
    saved = torch.load(os.path.join(trained, "spotlighter", "model.pth.tar-2"), weights_only=True)
    for k, v in saved["state_dict"].items():
        assert torch.equal(model.model.state_dict()[k], v), k
    assert torch.equal(model.model.head.memory.prototypes, saved["class_state"]["prototypes"])
    # the checkpoint file itself and the folder give the same model
    again = spotlighter.load_trained(os.path.join(trained, "spotlighter", "model.pth.tar-2"), BASE_CLASSNAMES)
    with torch.no_grad():
        assert torch.equal(again(x), logits)


@requires_dassl
def test_load_trained_without_dassl_gives_the_same_logits(trained, data_root):
    path = base_test_split(data_root)[0][0]
    code = textwrap.dedent(f"""
        import torch, spotlighter
        from tiny_data import BASE_CLASSNAMES
        try:
            import dassl
        except ImportError:
            print("no dassl")
        model = spotlighter.load_trained({trained!r}, BASE_CLASSNAMES)
        with torch.no_grad():
            print(model(model.preprocess({path!r})[None]).tolist())
    """)
    out = run_python(code, no_dassl=True).splitlines()
    assert out[0] == "no dassl"
    model = spotlighter.load_trained(trained, BASE_CLASSNAMES)
    with torch.no_grad():
        here = model(model.preprocess(path)[None])
    assert torch.tensor(json.loads(out[1])).equal(here)


def test_create_model_builds_every_trainer_without_dassl(tiny_clip_path):
    code = textwrap.dedent(f"""
        import torch, spotlighter
        changes = {{"TRAINER.MAPLE.PROMPT_DEPTH": 2, "TRAINER.SPOTLIGHTER.IRM.HEADS": 1}}
        for node in ("IVLP", "PROMPTSRC"):
            changes.update({{f"TRAINER.{{node}}.PROMPT_DEPTH_{{t}}": 2 for t in ("TEXT", "VISION")}})
        for trainer in ("zsclip", "coop", "cocoop", "maple", "ivlp", "promptsrc", "spotlighter"):
            model = spotlighter.create_model(trainer, ["cat", "dog", "red car"], backbone={tiny_clip_path!r},
                                             cfg=changes)
            with torch.no_grad():
                logits = model(torch.randn(2, 3, 32, 32))
            print(trainer, type(model.model).__name__, tuple(logits.shape), model.cfg.INPUT.PIXEL_MEAN[0])
    """)
    out = run_python(code, no_dassl=True).splitlines()
    assert [line.split()[:2] for line in out] == [
        ["zsclip", "ZeroShotCLIP"], ["coop", "CoOp"], ["cocoop", "CoCoOp"], ["maple", "MaPLe"], ["ivlp", "IVLP"],
        ["promptsrc", "PromptSRC"], ["spotlighter", "Spotlighter"]]
    assert all(line.endswith("(2, 3) 0.48145466") for line in out)


def test_create_model_is_the_factorys_model(tiny_clip_path):
    from spotlighter.factory import build_model, load_frozen_clip

    cfg = trainer_cfg("coop", {"MODEL.BACKBONE.PATH": tiny_clip_path, "TRAINER.COOP.N_CTX": 3})
    torch.manual_seed(0)
    ours = spotlighter.create_model("CoOp", ["cat", "dog"], backbone=tiny_clip_path, cfg={"TRAINER.COOP.N_CTX": 3})
    torch.manual_seed(0)
    direct = build_model(cfg, ["cat", "dog"], load_frozen_clip(cfg, precision="fp32"))
    assert ours.model.prompt_learner.ctx.shape == (3, 64)
    assert torch.equal(ours.model.prompt_learner.ctx, direct.prompt_learner.ctx)


def test_bad_input_is_a_clear_error(tmp_path, tiny_clip_path):
    with pytest.raises(KeyError, match=r"unknown trainer 'coopp'. Valid trainers: spotlighter coop cocoop maple "
                                       r"ivlp promptsrc promptkd spotlighterkd zsclip"):
        spotlighter.create_model("coopp", ["cat"])
    with pytest.raises(ConfigError, match=r"cfg: Non-existent key: TRAINER.COOP.NCTX \(the keys are Dassl.s "
                                          r"and those of spotlighter/config.py\)"):
        spotlighter.create_model("coop", ["cat"], backbone=tiny_clip_path, cfg={"TRAINER.COOP.NCTX": 2})
    with pytest.raises(ConfigError, match="classnames must be a non-empty list"):
        spotlighter.create_model("coop", [], backbone=tiny_clip_path)
    with pytest.raises(Exception, match=re.escape(f"MODEL.BACKBONE.PATH points to '{tmp_path}/clip.pt', which is "
                                                  "not a file")):
        spotlighter.create_model("coop", ["cat"], backbone=str(tmp_path / "clip.pt"))
    missing = str(tmp_path / "nowhere" / "seed1")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: no such file or folder")):
        spotlighter.load_trained(missing, ["cat"])
    with pytest.raises(ckpt.CheckpointError, match="holds neither config.yaml nor a checkpoint folder"):
        spotlighter.load_trained(str(tmp_path), ["cat"])


def _csc_run(folder, tiny_clip_path, classes):
    """An output folder as train.py writes it, of a class-specific-context CoOp for ``classes``."""
    model = spotlighter.create_model("coop", classes, backbone=tiny_clip_path, cfg={"TRAINER.COOP.CSC": True})
    state = ckpt.trainable_state(model.model)
    ckpt.save(str(folder / "prompt_learner" / "model.pth.tar-1"),
              {"trainer": "CoOp", "preset": None, "signature": {k: list(v.shape) for k, v in state.items()},
               "state_dict": state, "class_state": None, "epoch": 1})
    (folder / "prompt_learner" / "checkpoint").write_text("model.pth.tar-1\n")
    (folder / "config.yaml").write_text(model.cfg.dump())
    return model


def test_class_count_mismatch_names_both_numbers(tmp_path, tiny_clip_path):
    classes = ["cat", "dog", "car"]
    model = _csc_run(tmp_path, tiny_clip_path, classes)
    loaded = spotlighter.load_trained(str(tmp_path), classes)
    assert torch.equal(loaded.model.prompt_learner.ctx, model.model.prompt_learner.ctx)
    with pytest.raises(ckpt.CheckpointError, match=r"class-specific context \(CSC\) for 3 classes, but 2 class "
                                                   r"names were given: give the 3 class names"):
        spotlighter.load_trained(str(tmp_path), ["cat", "dog"])
    os.remove(tmp_path / "config.yaml")  # neither config.yaml nor run settings: say what to give
    with pytest.raises(ConfigError, match="records no run settings and its run folder has no config.yaml"):
        spotlighter.load_trained(str(tmp_path / "prompt_learner" / "model.pth.tar-1"), classes)


def test_original_coop_checkpoint_is_read_with_its_design(tmp_path, tiny_clip_path):
    from original_ckpt import coop_state, save_original

    ctx = torch.randn(6, 64)
    save_original(str(tmp_path), "prompt_learner", coop_state(ctx), epoch=3, use_dassl=False)
    model = spotlighter.load_trained(str(tmp_path), ["cat", "dog", "car"], backbone=tiny_clip_path)
    assert model.cfg.TRAINER.COOP.N_CTX == 6 and type(model.model).__name__ == "CoOp"
    assert torch.equal(model.model.prompt_learner.ctx, ctx)


# ------------------------------------------------------------------------------------------------
def readme_example() -> str:
    """The code block of README's "Use a trained prompt from Python" section."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Use a trained prompt from Python", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@requires_dassl
def test_readme_example_runs_as_written(trained, tmp_path):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 12
    run = re.search(r'run = "([^"]+)"', code).group(1)
    images = re.findall(r'"([^"]+\.(?:png|jpg))"', code)
    os.makedirs(tmp_path / os.path.dirname(run))
    os.symlink(trained, tmp_path / run)
    for i, name in enumerate(images):
        Image.new("RGB", (64, 48), (40 * i, 200, 90)).save(tmp_path / name)
    out = run_python(code, cwd=str(tmp_path), no_dassl=True).splitlines()
    classes = re.search(r"classnames = (\[.*?\])", code).group(1)
    assert len(out) == len(images)
    for line, name in zip(out, images):
        image, rest = line.split(" ", 1)
        cls, prob = rest.rsplit(" ", 1)
        assert image == name and cls in eval(classes) and 0 < float(prob) <= 1


# ------------------------------------------------------------------------------------------------
@requires_dassl
def test_tensorboard_has_every_loss_term_and_the_token_statistics(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(trained, "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"train/loss", "train/global", "train/local", "train/consistency", "train/acc", "train/lr",
            "train/sel_score", "train/sel_level1_weight", "test/accuracy"}
    assert want - tags == set(), sorted(tags)
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(len(steps))) and len(steps) >= 2  # one point per step
    weights = [e.value for e in acc.Scalars("train/sel_level1_weight")]
    assert all(0 < w < 1 for w in weights)  # a softmax weight of three sets (dynamic level weights)
    loss = acc.Scalars("train/loss")[-1].value  # running means of the terms add up to the loss's
    terms = sum(acc.Scalars(f"train/{t}")[-1].value for t in ("global", "local", "consistency"))
    assert loss == pytest.approx(terms, rel=1e-5)
