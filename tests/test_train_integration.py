"""The real ``train.py`` through upstream Dassl: train on base classes, save, evaluate on new classes.

Runs only when Dassl is importable (CI has no git access to install it).
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, requires_dassl, run_in_process
from tiny_data import BASE_CLASSNAMES, make_tiny_minibench

pytestmark = requires_dassl

# 16 patches (32 px, patch 8); tiny widths; short schedule.
FAST = ["INPUT.SIZE", "(32, 32)", "OPTIM.MAX_EPOCH", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
        "DATALOADER.TEST.BATCH_SIZE", "8", "DATALOADER.NUM_WORKERS", "0", "DATASET.NUM_SHOTS", "4"]
CONFIGS = {
    "Spotlighter": "configs/trainers/Spotlighter/vit_b16_ep20_paper.yaml",
    "Spotlighter-release": "configs/trainers/Spotlighter/vit_b16_ep20_release.yaml",
    "CoOp": "configs/trainers/CoOp/vit_b16_ep20_ctx4.yaml",
    "CoCoOp": "configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml",
    "MaPLe": "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml",
    "ZeroshotCLIP": "configs/trainers/ZeroshotCLIP/vit_b16.yaml",
    "IVLP": "configs/trainers/IVLP/vit_b16_c2_ep20_batch4_4+4ctx.yaml",
    "PromptSRC": "configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml",
    "PromptKD": "configs/trainers/PromptKD/vit_b16_c2_ep20_batch8_4+4ctx.yaml",
    "SpotlighterKD": "configs/trainers/SpotlighterKD/vit_b16_ep30_batch64_release.yaml",
}
EXTRA = {"Spotlighter": ["TRAINER.SPOTLIGHTER.IRM.HEADS", "1"],
         "Spotlighter-release": ["TRAINER.SPOTLIGHTER.IRM.HEADS", "1"],
         "MaPLe": ["TRAINER.MAPLE.PROMPT_DEPTH", "2"],
         "IVLP": ["TRAINER.IVLP.PROMPT_DEPTH_TEXT", "2", "TRAINER.IVLP.PROMPT_DEPTH_VISION", "2"],
         "PromptSRC": ["TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "2", "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2",
                       "TRAINER.PROMPTSRC.GPA_MEAN", "1"]}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, tiny_clip_path):
    root = tmp_path_factory.mktemp("data")
    make_tiny_minibench(str(root))
    return str(root)


def train_cmd(data_root, clip_path, out, trainer="Spotlighter", subset="base", extra=(), eval_only=False,
              model_dir=None, load_epoch=None):
    cmd = [sys.executable, "train.py", "--root", data_root, "--seed", "1",
           "--trainer", trainer.split("-")[0], "--dataset-config-file", "configs/datasets/minibench.yaml",
           "--config-file", CONFIGS[trainer], "--output-dir", str(out)]
    if eval_only:
        cmd.append("--eval-only")
    if model_dir:
        cmd += ["--model-dir", str(model_dir)]
    if load_epoch is not None:
        cmd += ["--load-epoch", str(load_epoch)]
    return cmd + FAST + EXTRA.get(trainer, []) + ["MODEL.BACKBONE.PATH", clip_path,
                                                  "DATASET.SUBSAMPLE_CLASSES", subset] + list(extra)


def run_train(data_root, clip_path, out, trainer="Spotlighter", subset="base", extra=(), eval_only=False,
              model_dir=None, load_epoch=None, check=True, env=None):
    cmd = train_cmd(data_root, clip_path, out, trainer, subset, extra, eval_only, model_dir, load_epoch)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc




def train_argv(data_root, clip_path, out, trainer="Spotlighter", extra=()):
    return (["--root", data_root, "--seed", "1", "--trainer", trainer.split("-")[0],
             "--dataset-config-file", os.path.join(ROOT, "configs/datasets/minibench.yaml"),
             "--config-file", os.path.join(ROOT, CONFIGS[trainer]), "--output-dir", str(out)]
            + FAST + EXTRA.get(trainer, []) + ["MODEL.BACKBONE.PATH", clip_path] + list(extra))


def read_result(folder):
    with open(os.path.join(folder, "result.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def spot_base(tmp_path_factory, data_root, tiny_clip_path):
    out = tmp_path_factory.mktemp("out") / "train_base"
    proc = run_train(data_root, tiny_clip_path, out)
    return out, proc


def test_train_base_then_eval_new(spot_base, data_root, tiny_clip_path, tmp_path):
    out, proc = spot_base
    log = open(out / "log.txt").read()
    assert "Finish training" in log and "=> result" in log
    assert "is deprecated" not in proc.stderr  # no packaging notice opens every run
    assert "Trainable scalars: 33,536" in log  # ctx 4x64 + mapper + TRM + IRM at d = 64
    ckpt_path = out / "spotlighter" / "model.pth.tar-2"
    assert (out / "spotlighter" / "checkpoint").read_text().strip() == "model.pth.tar-2"
    data = torch.load(ckpt_path, weights_only=True)  # no pickled objects
    assert data["trainer"] == "Spotlighter" and data["preset"] == "paper" and data["epoch"] == 2
    assert not any(k.startswith(("clip", "visual", "transformer", "token_embedding")) or ".clip." in k
                   for k in data["state_dict"])
    assert data["class_state"]["classnames"] == BASE_CLASSNAMES
    assert os.path.getsize(ckpt_path) < 1_000_000
    rec = read_result(out)
    assert (rec["trainer"], rec["subset"], rec["shots"], rec["seed"], rec["epoch"]) == ("Spotlighter", "base", 4, 1, 2)
    assert rec["total"] == 36 and rec["accuracy"] == pytest.approx(100 * rec["correct"] / 36)  # 12 x 3
    assert rec["config"] == "vit_b16_ep20_paper" and rec["dataset"] == "minibench"

    new = tmp_path / "test_new"
    run_train(data_root, tiny_clip_path, new, subset="new", eval_only=True, model_dir=out, load_epoch=2)
    new_log = open(new / "log.txt").read()
    assert "0 classes loaded from the checkpoint by name, 12 start from their zero-shot text embedding" in new_log
    rec_new = read_result(new)
    assert rec_new["subset"] == "new" and rec_new["total"] == 36 and rec_new["epoch"] == 2

    # all classes: the 12 trained classes' prototypes are mapped back by name
    both = tmp_path / "all"
    run_train(data_root, tiny_clip_path, both, subset="all", eval_only=True, model_dir=out, load_epoch=2)
    assert "12 classes loaded from the checkpoint by name, 12 start" in open(both / "log.txt").read()


def test_eval_is_deterministic_and_uses_the_trained_prototypes(spot_base, data_root, tiny_clip_path, tmp_path):
    out, _ = spot_base
    a, b = tmp_path / "a", tmp_path / "b"
    run_train(data_root, tiny_clip_path, a, subset="base", eval_only=True, model_dir=out, load_epoch=2)
    run_train(data_root, tiny_clip_path, b, subset="base", eval_only=True, model_dir=out)  # last via pointer
    assert read_result(a)["correct"] == read_result(b)["correct"] == read_result(out)["correct"]


def test_resume_continues_from_last_checkpoint(data_root, tiny_clip_path, tmp_path):
    out = tmp_path / "resume"
    killed = run_train(data_root, tiny_clip_path, out, trainer="CoOp", check=False,
                       env={"SPOTLIGHTER_TEST_KILL_AFTER_EPOCH": "1"})
    assert killed.returncode == -9
    first = torch.load(out / "prompt_learner" / "model.pth.tar-1", weights_only=True)
    assert first["settings"]["OPTIM.MAX_EPOCH"] == 2 and first["settings"]["SEED"] == 1
    assert first["settings"]["DATASET.NUM_SHOTS"] == 4 and "OUTPUT_DIR" not in first["settings"]
    proc = run_train(data_root, tiny_clip_path, out, trainer="CoOp", extra=["TRAIN.PRINT_FREQ", "3"])
    assert "Resumed from" in proc.stdout and "(epoch 1)" in proc.stdout
    assert "epoch [1/2]" not in proc.stdout and "epoch [2/2]" in proc.stdout
    second = torch.load(out / "prompt_learner" / "model.pth.tar-2", weights_only=True)
    assert second["scheduler"]["last_epoch"] == 2 and second["optimizer"]["state"]
    assert not torch.equal(first["state_dict"]["prompt_learner.ctx"], second["state_dict"]["prompt_learner.ctx"])

    # killed during the final test: the resume starts at the last epoch, runs no epoch, tests it
    os.remove(out / "result.json")
    proc = run_train(data_root, tiny_clip_path, out, trainer="CoOp")
    assert "(epoch 2)" in proc.stdout and "epoch [" not in proc.stdout
    assert read_result(out)["epoch"] == 2


@pytest.mark.parametrize("trainer", ["Spotlighter-release", "CoCoOp", "MaPLe", "IVLP"])
def test_other_trainers_train_and_evaluate(trainer, data_root, tiny_clip_path, tmp_path):
    out = tmp_path / trainer
    run_train(data_root, tiny_clip_path, out, trainer=trainer, extra=["OPTIM.MAX_EPOCH", "1"])
    rec = read_result(out)
    assert rec["trainer"] == trainer.split("-")[0] and rec["total"] == 36 and rec["epoch"] == 1
    if trainer == "Spotlighter-release":
        assert rec["preset"] == "release"
        assert "Trainable scalars: 33,536" in open(out / "log.txt").read()


def test_zero_shot_eval_only(data_root, tiny_clip_path, tmp_path):
    out = tmp_path / "zs"
    run_train(data_root, tiny_clip_path, out, trainer="ZeroshotCLIP", eval_only=True)
    rec = read_result(out)
    assert rec["trainer"] == "ZeroshotCLIP" and rec["epoch"] is None and rec["subset"] == "base"


@pytest.mark.parametrize("extra, message", [
    (["TRAINER.SPOTLIGHTER.TOP_K", "20", "TRAINER.SPOTLIGHTER.LEVEL_SIZES", "[10, 10]"],
     "TRAINER.SPOTLIGHTER.TOP_K = 20 is invalid: expected at most the number of patches (16)"),
    (["TRAINER.SPOTLIGHTER.LEVEL_SIZES", "[2, 2]"], "TRAINER.SPOTLIGHTER.LEVEL_SIZES = [2, 2] is invalid"),
    (["TRAINER.SPOTLIGHTER.MEMORY.PROTOTYPES_PER_CLASS", "0"], "the memory cannot be empty"),
    (["TRAINER.SPOTLIGHTER.PRESET", "fancy"], "TRAINER.SPOTLIGHTER.PRESET = 'fancy' is unknown"),
    (["TRAINER.SPOTLIGHTER.TOP_K", "five"], "TRAINER.SPOTLIGHTER.TOP_K"),
    (["TRAINER.SPOTLIGHTER.NO_SUCH_KEY", "1"], "TRAINER.SPOTLIGHTER.NO_SUCH_KEY"),
    (["TRAINER.SPOTLIGHTER.PREC", "fp8"], "TRAINER.SPOTLIGHTER.PREC = 'fp8' is invalid"),
    (["OPTIM.MAX_EPOCH", "-3"], "error: OPTIM.MAX_EPOCH = -3 is invalid: expected an integer >= 1."),
    (["OPTIM.NAME", "sgdd"], "error: OPTIM.NAME = 'sgdd' is invalid: expected one of"),
    (["SEED", "4294967296"], "error: SEED (--seed) = 4294967296 is invalid"),
    (["TRAINER.SPOTLIGHTER.IRM.HEADS", "7"], "error: TRAINER.SPOTLIGHTER.IRM.HEADS = 7 is invalid: expected a "
                                             "divisor of the CLIP's embedding width"),
    (["TRAINER.SPOTLIGHTER.CTX_INIT", " ".join(["photo"] * 80)],
     "error: TRAINER.SPOTLIGHTER.CTX_INIT = 'photo photo"),
])
def test_bad_config_is_a_clear_error(extra, message, data_root, tiny_clip_path, tmp_path, capsys):
    code, err = run_in_process(train_argv(data_root, tiny_clip_path, tmp_path / "bad", extra=extra), capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_yaml_syntax_error_names_file_and_line(data_root, tiny_clip_path, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("OPTIM:\n  LR: [0.002\n  MAX_EPOCH: 2\n")
    argv = train_argv(data_root, tiny_clip_path, tmp_path / "out", trainer="CoOp")
    argv[argv.index("--config-file") + 1] = str(bad)
    code, err = run_in_process(argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"error: --config-file {bad} is not valid YAML (line 3, column")
    assert not (tmp_path / "out").exists()  # refused before the output folder is touched


def test_resume_of_a_missing_folder_is_refused(data_root, tiny_clip_path, tmp_path, capsys):
    argv = train_argv(data_root, tiny_clip_path, tmp_path / "out", trainer="CoOp") + []
    argv[:0] = ["--resume", str(tmp_path / "no-such-run")]
    code, err = run_in_process(argv, capsys)
    assert code == 2 and err.strip() == (f"error: --resume {tmp_path}/no-such-run: no such folder. Give the output "
                                         "folder of the run to resume (a run started again with the same "
                                         "--output-dir resumes by itself).")
    assert not (tmp_path / "out").exists()


def test_unknown_trainer(data_root, tiny_clip_path, tmp_path, capsys):
    argv = ["--root", data_root, "--trainer", "SpotLight", "--dataset-config-file",
            os.path.join(ROOT, "configs/datasets/minibench.yaml"), "--output-dir", str(tmp_path / "x")]
    code, err = run_in_process(argv, capsys)
    assert code == 2 and "unknown trainer 'SpotLight'" in err and "Spotlighter" in err


def test_nan_loss_stops_with_precision_and_step(data_root, tiny_clip_path, tmp_path, capsys, monkeypatch):
    from spotlighter import models

    def nan_forward(self, images, labels=None):
        logits = torch.zeros(images.shape[0], 12, requires_grad=True)
        return logits, {"ce": logits.sum() * float("nan")}

    monkeypatch.setattr(models.CoOp, "forward", nan_forward)
    code, err = run_in_process(train_argv(data_root, tiny_clip_path, tmp_path / "nan", trainer="CoOp",
                                          extra=["DATASET.SUBSAMPLE_CLASSES", "base"]), capsys)
    assert code == 2
    assert "at epoch 1, batch 1 (step 1) with precision fp32" in err
    # no update has happened: the learning rate cannot be the cause, and no half precision is in use
    assert "This is the first step, before any update, so OPTIM.LR is not the cause" in err
    assert "The run is in full precision (fp32): check the CLIP weights (MODEL.BACKBONE.NAME / PATH)" in err
    assert "lower OPTIM.LR" not in err and "PREC" not in err
    assert len(err.strip().splitlines()) == 1


def test_nan_after_updates_blames_the_updates(data_root, tiny_clip_path, tmp_path, capsys, monkeypatch):
    from spotlighter import models

    forward, calls = models.CoOp.forward, []

    def nan_at_call_5(self, images, labels=None):
        logits, losses = forward(self, images, labels)
        calls.append(1)
        return logits, ({"ce": losses["ce"] * float("nan")} if len(calls) == 5 and self.training else losses)

    monkeypatch.setattr(models.CoOp, "forward", nan_at_call_5)
    code, err = run_in_process(train_argv(data_root, tiny_clip_path, tmp_path / "nan", trainer="CoOp"), capsys)
    assert code == 2 and "The loss is nan at epoch 1, batch 5 (step 5) with precision fp32" in err
    assert "the updates so far drove the model there: lower OPTIM.LR (now 0.002)" in err
    assert "the same settings diverge again at the same step" in err and "--restart" in err


def test_overflowing_update_is_caught_before_any_checkpoint_holds_it(data_root, tiny_clip_path, tmp_path, capsys,
                                                                     monkeypatch):
    """An optimizer step that makes a parameter infinite (epoch 2, batch 2) stops the run at once:
    the epoch-1 checkpoint stays finite, and a checkpoint that holds NaN (written by hand here) is
    never resumed from."""
    from spotlighter import checkpoint as ckpt

    step, calls = torch.optim.SGD.step, []

    def overflow_at_call_26(self, *a, **k):
        out = step(self, *a, **k)
        calls.append(1)
        if len(calls) == 26:  # 24 batches per epoch (all 24 classes x 4 shots)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", overflow_at_call_26)
    out = tmp_path / "inf"
    code, err = run_in_process(train_argv(data_root, tiny_clip_path, out, trainer="CoOp"), capsys)
    assert code == 2
    assert ("error: The optimizer step at epoch 2, batch 2 (step 26) made 1 trainable tensor(s) non-finite "
            "(prompt_learner.ctx) although the loss was finite (") in err
    assert "the update overflowed. Lower OPTIM.LR (now 0.002). Checkpoints written before this step hold finite" in err
    (kept,) = (out / "prompt_learner").glob("model.pth.tar-*")
    assert kept.name == "model.pth.tar-1" and ckpt.non_finite(torch.load(kept, weights_only=True)["state_dict"]) == []

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    data = torch.load(kept, weights_only=True)
    data["state_dict"]["prompt_learner.ctx"][0, 0] = float("nan")
    torch.save(data, kept)
    code, err = run_in_process(train_argv(data_root, tiny_clip_path, out, trainer="CoOp"), capsys)
    assert code == 2 and err.strip() == (
        f"error: {kept} holds non-finite values (prompt_learner.ctx): the run diverged before it was written, "
        "and resuming would continue from there. Start over with --restart (scripts/*.sh: FORCE=1), or give "
        "another --output-dir.")


def test_checkpoint_of_another_preset_or_trainer_is_refused(spot_base, data_root, tiny_clip_path, tmp_path):
    out, _ = spot_base
    proc = run_train(data_root, tiny_clip_path, tmp_path / "rel", trainer="Spotlighter-release", subset="new",
                     eval_only=True, model_dir=out, load_epoch=2, check=False)
    assert proc.returncode == 2 and "PRESET = 'paper'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_train(data_root, tiny_clip_path, tmp_path / "mism", subset="new", eval_only=True, model_dir=out,
                     load_epoch=2, extra=["TRAINER.SPOTLIGHTER.MAPPER.HIDDEN", "128"], check=False)
    assert proc.returncode == 2 and "head.mapper.net.0.weight" in proc.stderr
    proc = run_train(data_root, tiny_clip_path, tmp_path / "coop", trainer="CoOp", subset="new",
                     eval_only=True, model_dir=out, load_epoch=2, check=False)
    assert proc.returncode == 2 and "No checkpoint" in proc.stderr  # CoOp's folder is prompt_learner/
    proc = run_train(data_root, tiny_clip_path, tmp_path / "ep", subset="new", eval_only=True, model_dir=out,
                     load_epoch=7, check=False)
    assert proc.returncode == 2 and "model.pth.tar-7" in proc.stderr and "model.pth.tar-2" in proc.stderr


def test_missing_clip_weights_file(data_root, tmp_path, capsys):
    code, err = run_in_process(train_argv(data_root, str(tmp_path / "nope.pt"), tmp_path / "o"), capsys)
    assert code == 2 and "nope.pt" in err and "not a file" in err


def test_zero_shot_refuses_to_train(data_root, tiny_clip_path, tmp_path, capsys):
    code, err = run_in_process(train_argv(data_root, tiny_clip_path, tmp_path / "zs", trainer="ZeroshotCLIP"), capsys)
    assert code == 2 and "ZeroshotCLIP has no trainable parameters: run it with --eval-only" in err


def test_fp16_on_cpu_falls_back_to_fp32_with_a_warning(data_root, tiny_clip_path, tmp_path, capsys):
    out = tmp_path / "fp16"
    code, _ = run_in_process(["--eval-only"] + train_argv(data_root, tiny_clip_path, out, trainer="ZeroshotCLIP",
                                                          extra=["TRAINER.ZSCLIP.PREC", "fp16"]), capsys)
    log = open(out / "log.txt").read()
    assert code == 0 and "PREC = fp16 is not supported on CPU" in log and "precision fp32 on cpu" in log


def test_final_model_best_val_deploys_the_best_checkpoint(data_root, tiny_clip_path, tmp_path):
    out = tmp_path / "best"
    proc = run_train(data_root, tiny_clip_path, out, trainer="CoOp", extra=["TEST.FINAL_MODEL", "best_val"])
    best_path = out / "prompt_learner" / "model-best.pth.tar"
    best = torch.load(best_path, weights_only=True)
    assert "Deploy the model with the best val performance" in proc.stdout
    assert best["val_result"] is not None and 1 <= best["epoch"] <= 2
    assert f"Loaded {best_path} (epoch {best['epoch']})" in proc.stdout
    assert read_result(out)["epoch"] == best["epoch"]


def test_best_val_on_a_dataset_whose_val_is_its_test_warns(tmp_path, tiny_clip_path, capsys):
    root = tmp_path / "data"
    folder = make_tiny_minibench(str(root))
    split_file = os.path.join(folder, "split_zhou_MiniBench.json")
    split = json.load(open(split_file))
    split["val"] = split["test"]  # like CoOp's ImageNet
    json.dump(split, open(split_file, "w"))
    out = tmp_path / "out"
    code, _ = run_in_process(["--eval-only"] + train_argv(str(root), tiny_clip_path, out, trainer="ZeroshotCLIP",
                                                          extra=["TEST.FINAL_MODEL", "best_val"]), capsys)
    assert code == 0
    assert "the model would be selected on the test set" in open(out / "log.txt").read()


def test_unreadable_image_is_named(tmp_path, tiny_clip_path, capsys):
    root = tmp_path / "data"
    folder = make_tiny_minibench(str(root))
    split = json.load(open(os.path.join(folder, "split_zhou_MiniBench.json")))
    bad = os.path.join(folder, "images", split["test"][0][0])
    open(bad, "wb").write(b"not a png")
    argv = ["--eval-only"] + train_argv(str(root), tiny_clip_path, tmp_path / "o", trainer="ZeroshotCLIP",
                                        extra=["DATALOADER.NUM_WORKERS", "1"])
    code, err = run_in_process(argv, capsys)
    assert code == 2 and f"cannot read image {bad} (UnidentifiedImageError" in err and "Traceback" not in err


@pytest.mark.parametrize("pixels, kind", [(200_000_000, "DecompressionBombError"),
                                          (100_000_000, "DecompressionBombWarning")])
def test_decompression_bomb_is_named(pixels, kind, tmp_path, tiny_clip_path, capsys):
    from PIL import Image

    root = tmp_path / "data"
    folder = make_tiny_minibench(str(root))
    split = json.load(open(os.path.join(folder, "split_zhou_MiniBench.json")))
    bomb = os.path.join(folder, "images", split["test"][0][0])
    Image.new("1", (20000, pixels // 20000)).save(bomb, format="PNG")  # a few kB that decode to `pixels`
    argv = ["--eval-only"] + train_argv(str(root), tiny_clip_path, tmp_path / "o", trainer="ZeroshotCLIP",
                                        extra=["DATALOADER.NUM_WORKERS", "1"])
    code, err = run_in_process(argv, capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]  # (stderr also has tqdm's bar)
    assert line.startswith(f"error: image {bomb} is refused: Image size ({pixels} pixels) exceeds limit of ")
    assert "PIL.Image.MAX_IMAGE_PIXELS = 89,478,485" in err and "remove it from the split file" in err


# ----------------------------------------------------------------------------- original-repo checkpoints
ORIGINAL_LAYOUTS = [  # (trainer, write Dassl's 'checkpoint' pointer, --load-epoch)
    ("CoOp", True, None),
    ("CoCoOp", False, 2),
    ("MaPLe", False, None),  # neither pointer nor epoch: the last model.pth.tar-N
    ("IVLP", True, None),
    ("PromptSRC", False, 2),
]


@pytest.mark.parametrize("trainer, pointer, load_epoch", ORIGINAL_LAYOUTS)
def test_eval_only_reads_original_repo_checkpoints(trainer, pointer, load_epoch, data_root, tiny_clip_path,
                                                  tmp_path, capsys):
    """--eval-only --model-dir on a folder the original repo wrote = the same weights in our format."""
    from original_ckpt import BUILD, original_keys, perturbed, save_original

    from spotlighter import checkpoint as ckpt
    from spotlighter.backbone import FrozenCLIP, load_clip

    build, module = BUILD[trainer]
    model = perturbed(build(FrozenCLIP(load_clip("ViT-B/16", path=tiny_clip_path))))
    save_original(tmp_path / "theirs", module, original_keys(trainer, model), epoch=2, pointer=pointer)
    if not pointer:  # an earlier epoch beside it, with other weights: the pointer-less folder picks epoch 2
        save_original(tmp_path / "theirs", module, original_keys(trainer, perturbed(build(model.clip), seed=5)),
                      epoch=1, pointer=False)
    state = ckpt.trainable_state(model)
    ckpt.save(str(tmp_path / "ours" / module / "model.pth.tar-2"),
              {"trainer": trainer, "preset": None, "signature": {k: list(v.shape) for k, v in state.items()},
               "state_dict": state, "class_state": None, "epoch": 2})

    for name, folder, epoch in (("eval_theirs", "theirs", load_epoch), ("eval_ours", "ours", 2)):
        argv = ["--eval-only", "--model-dir", str(tmp_path / folder)]
        argv += ["--load-epoch", str(epoch)] if epoch is not None else []
        code, err = run_in_process(argv + train_argv(data_root, tiny_clip_path, tmp_path / name, trainer=trainer,
                                                     extra=["DATASET.SUBSAMPLE_CLASSES", "base"]), capsys)
        assert code == 0, err
    log = open(tmp_path / "eval_theirs" / "log.txt").read()
    assert f"was written by the original {trainer} code: converted" in log
    if not pointer and load_epoch is None:
        assert "loading the last epoch's model.pth.tar-2" in log
    theirs, ours = read_result(tmp_path / "eval_theirs"), read_result(tmp_path / "eval_ours")
    assert theirs["epoch"] == 2 and theirs["total"] == 36
    assert (theirs["correct"], theirs["macro_f1"]) == (ours["correct"], ours["macro_f1"])


def test_original_checkpoint_of_another_shape_names_the_keys(data_root, tiny_clip_path, tmp_path, capsys):
    from original_ckpt import coop_state, save_original

    save_original(tmp_path / "theirs", "prompt_learner", coop_state(torch.zeros(16, 64).half()), epoch=3)
    argv = ["--eval-only", "--model-dir", str(tmp_path / "theirs")]
    code, err = run_in_process(argv + train_argv(data_root, tiny_clip_path, tmp_path / "o", trainer="CoOp"), capsys)
    assert code == 2 and "Traceback" not in err
    assert "prompt_learner.ctx: checkpoint [16, 64] vs config [4, 64]" in err and "TRAINER.COOP.N_CTX" in err


def test_dataset_warnings_land_in_log_txt(tmp_path, tiny_clip_path, capsys):
    """Few-shot shortfalls (and path remaps) are logged, so Dassl's log.txt keeps them."""
    root = tmp_path / "data"
    make_tiny_minibench(str(root))  # fresh: the few-shot split is made (and checked) in this run
    out = tmp_path / "zs"
    code, err = run_in_process(["--eval-only"] + train_argv(str(root), tiny_clip_path, out, trainer="ZeroshotCLIP"),
                               capsys)
    assert code == 0, err
    log = open(out / "log.txt").read()
    assert "MiniBench val split: 4 shots requested but 24 class(es) have fewer images" in log
    assert "all their images are used" in log and "Saving preprocessed few-shot data to" in log


# ------------------------------------------------------------------ reliability (issue 11)
def flat_tensors(obj, prefix=""):
    """Every tensor of a checkpoint, keyed by its path in the payload."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from flat_tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flat_tensors(v, f"{prefix}/{i}")


def epoch_lines(text, first_epoch):
    """The per-batch lines of epochs >= first_epoch without their timing fields."""
    import re

    out = []
    for line in text.splitlines():
        m = re.match(r"epoch \[(\d+)/\d+\]", line)
        if m and int(m.group(1)) >= first_epoch:
            out.append(re.sub(r" (time|data) \S+ \(\S+\)| eta \S+", "", line))
    return out


def test_killed_run_resumes_bit_identically(data_root, tiny_clip_path, tmp_path):
    """SIGKILL right after epoch 2 of 4, rerun: the resumed run equals an uninterrupted one in every
    saved tensor (model, class memory, optimizer, scheduler, RNG states), in its per-batch losses
    and in its result; disk holds at most one resumable checkpoint besides the final one; the lock
    the killed process left is taken over."""
    from spotlighter.runlock import INFO_FILE

    extra = ["OPTIM.MAX_EPOCH", "4", "TEST.FINAL_MODEL", "best_val"]
    ref, cut = tmp_path / "uninterrupted", tmp_path / "killed"
    run_train(data_root, tiny_clip_path, ref, extra=extra)
    assert sorted(os.listdir(ref / "spotlighter")) == ["checkpoint", "model-best.pth.tar", "model.pth.tar-4"]

    killed = run_train(data_root, tiny_clip_path, cut, extra=extra, check=False,
                       env={"SPOTLIGHTER_TEST_KILL_AFTER_EPOCH": "2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "epoch [3/4]" not in killed.stdout
    # the newest intermediate only (epoch 1's was removed when epoch 2's was written)
    assert sorted(os.listdir(cut / "spotlighter")) == ["checkpoint", "model-best.pth.tar", "model.pth.tar-2"]
    dead_pid = json.loads((cut / INFO_FILE).read_text())["pid"]

    resumed = run_train(data_root, tiny_clip_path, cut, extra=extra)
    assert f"Took over the lock of {cut} left by a process that is no longer running (pid {dead_pid} " in resumed.stdout
    assert f"Resumed from {cut}/spotlighter/model.pth.tar-2 (epoch 2)" in resumed.stdout
    assert "epoch [2/4]" not in resumed.stdout and "epoch [3/4]" in resumed.stdout
    assert sorted(os.listdir(cut / "spotlighter")) == ["checkpoint", "model-best.pth.tar", "model.pth.tar-4"]

    ref_log = open(ref / "log.txt").read()
    assert epoch_lines(resumed.stdout, 3) == epoch_lines(ref_log, 3) and len(epoch_lines(ref_log, 3)) == 4
    for name in ("model.pth.tar-4", "model-best.pth.tar"):
        a = dict(flat_tensors(torch.load(ref / "spotlighter" / name, weights_only=True)))
        b = dict(flat_tensors(torch.load(cut / "spotlighter" / name, weights_only=True)))
        assert a.keys() == b.keys() and any(k.startswith("/rng/") for k in a)
        assert any(k.startswith("/class_state/prototypes") for k in a)
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], name
    ra, rb = read_result(ref), read_result(cut)
    assert (ra["correct"], ra["accuracy"], ra["macro_f1"], ra["epoch"]) == \
        (rb["correct"], rb["accuracy"], rb["macro_f1"], rb["epoch"])


def test_two_runs_on_one_output_folder(data_root, tiny_clip_path, tmp_path):
    """A second process on a folder in use stops at once with the holder's pid, host and start time,
    and touches nothing; the first finishes normally."""
    import signal
    import socket
    import time

    from spotlighter.runlock import INFO_FILE, lock_holder

    out = tmp_path / "job"
    first = subprocess.Popen(train_cmd(data_root, tiny_clip_path, out, trainer="CoOp"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / INFO_FILE).is_file() or json.loads((out / INFO_FILE).read_text() or "{}").get("pid") != first.pid:
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # holds the lock for as long as the second one needs
        stopped_by = time.time() + 30  # the signal is asynchronous: wait until the kernel says it is stopped
        while os.path.exists(f"/proc/{first.pid}/stat") and \
                open(f"/proc/{first.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
            assert time.time() < stopped_by
            time.sleep(0.01)
        holder = lock_holder(str(out))
        assert holder.pid == first.pid and holder.host == socket.gethostname()
        before = sorted(os.listdir(out))
        second = run_train(data_root, tiny_clip_path, out, trainer="CoOp", check=False)
        assert second.returncode == 2
        err = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith(f"error: {out} is in use by pid {first.pid} on {holder.host}, "
                                                    f"started {holder.started} (")
        assert "another --output-dir" in err[0]
        assert sorted(os.listdir(out)) == before  # no second log, nothing read or written
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert open(out / "log.txt").read().count("Command: ") == 1 and not list(out.glob("log.txt-*"))
    assert read_result(out)["epoch"] == 2 and lock_holder(str(out)) is None


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("eval_only", [False, True])
def test_crafted_few_shot_pickle_never_runs(eval_only, tmp_path, tiny_clip_path, capsys):
    import pickle

    root = tmp_path / "data"
    folder = make_tiny_minibench(str(root))
    marker = tmp_path / "MARKER"
    os.makedirs(os.path.join(folder, "split_fewshot"))
    cache = os.path.join(folder, "split_fewshot", "shot_4-seed_1.pkl")
    with open(cache, "wb") as f:
        pickle.dump({"train": [_RunsCode(marker)], "val": []}, f)
    argv = train_argv(str(root), tiny_clip_path, tmp_path / "o", trainer="ZeroshotCLIP" if eval_only else "CoOp")
    code, err = run_in_process((["--eval-only"] if eval_only else []) + argv, capsys)
    assert code == 2 and not marker.exists()
    assert f"error: {cache} is not a file of Dassl Datum objects: it refers to posix.system" in err
    assert "delete it (it is re-created from the split file; the same seed gives the same sample)" in err


def _eval_argv(data_root, clip_path, out, model_dir, extra=()):
    return ["--eval-only", "--model-dir", str(model_dir)] + train_argv(
        data_root, clip_path, out, extra=["DATASET.SUBSAMPLE_CLASSES", "new", *extra])


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"", "is empty (0 bytes): it was never written completely"),
    (lambda b: b[: len(b) // 2], "is truncated or corrupt ("),
])
def test_damaged_checkpoint_is_one_line(damage, message, spot_base, data_root, tiny_clip_path, tmp_path, capsys):
    import shutil

    out, _ = spot_base
    model = tmp_path / "model"
    shutil.copytree(out / "spotlighter", model / "spotlighter")
    path = model / "spotlighter" / "model.pth.tar-2"
    path.write_bytes(damage(path.read_bytes()))
    code, err = run_in_process(_eval_argv(data_root, tiny_clip_path, tmp_path / "e", model), capsys)
    assert code == 2 and err.strip() == err.strip().splitlines()[0]  # one line
    assert err.startswith(f"error: {path} {message}") and "Traceback" not in err
    assert open(tmp_path / "e" / "log.txt").read().count("error: ") == 1


def test_prototype_count_mismatch_names_the_key_and_file(spot_base, data_root, tiny_clip_path, tmp_path, capsys):
    out, _ = spot_base
    code, err = run_in_process(_eval_argv(data_root, tiny_clip_path, tmp_path / "e", out,
                                          ["TRAINER.SPOTLIGHTER.MEMORY.PROTOTYPES_PER_CLASS", "2"]), capsys)
    assert code == 2
    assert err.strip() == (f"error: {out}/spotlighter/model.pth.tar-2: class_state['prototypes'] holds 4 prototypes "
                           "per class, but TRAINER.SPOTLIGHTER.MEMORY.PROTOTYPES_PER_CLASS = 2: evaluate it with "
                           "the value it was trained with (4).")


def test_unwritable_output_folder_is_one_line(data_root, tiny_clip_path, tmp_path, capsys, monkeypatch):
    import errno

    from spotlighter import runlock

    target = tmp_path / "ro" / "job"

    def read_only(self):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))

    monkeypatch.setattr(runlock.OutputLock, "acquire", read_only)
    code, err = run_in_process(train_argv(data_root, tiny_clip_path, target, trainer="CoOp"), capsys)
    assert code == 2 and not target.exists()
    assert err.strip() == (f"error: cannot write {target} (Read-only file system): give a --output-dir on a "
                           "writable file system that you may write to.")


def test_full_disk_while_saving_is_one_line(data_root, tiny_clip_path, tmp_path, capsys, monkeypatch):
    from spotlighter import checkpoint

    def full(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 0 vs 12: "
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(checkpoint, "_nearly_full", lambda path: True)
    out = tmp_path / "full"
    code, err = run_in_process(train_argv(data_root, tiny_clip_path, out, trainer="CoOp",
                                          extra=["OPTIM.MAX_EPOCH", "1"]), capsys)
    assert code == 2
    assert err.startswith(f"error: cannot write {out}/prompt_learner/model.pth.tar-1 (No space left on device): "
                          "free space on that file system")
    assert len(err.strip().splitlines()) == 1 and not list((out / "prompt_learner").glob("*.tmp-*"))


@pytest.mark.parametrize("mode", ["drop", "merge"])
def test_pruned_training_then_pictures_of_the_trained_model(data_root, tiny_clip_path, tmp_path, mode):
    """MODEL.PRUNE (both modes) through train.py (training and test), then scripts/pictures.py on that
    model dir."""
    import glob

    import numpy as np
    from PIL import Image

    from spotlighter import pictures

    out = tmp_path / "pruned"
    prune = ["MODEL.PRUNE.LAYERS", "[0]", "MODEL.PRUNE.KEEP", "0.5", "MODEL.PRUNE.MODE", mode]
    run_train(data_root, tiny_clip_path, out, extra=prune)
    log = open(out / "log.txt").read()
    assert f"Token reduction ({mode}): blocks [0] keep 0.5" in log and "8 of 16 patches reach the last block" in log
    assert read_result(out)["total"] == 36

    images = sorted(glob.glob(os.path.join(data_root, "minibench", "images", "*", "test_*.png")))[:2]
    pics = tmp_path / "pics"
    cmd = [sys.executable, "scripts/pictures.py", "--root", data_root, "--config-file", CONFIGS["Spotlighter"],
           "--dataset-config-file", "configs/datasets/minibench.yaml", "--model-dir", str(out), "--images", *images,
           "--out", str(pics), "--cell", "10", *FAST, *EXTRA["Spotlighter"], "MODEL.BACKBONE.PATH", tiny_clip_path,
           "DATASET.SUBSAMPLE_CLASSES", "base", *prune]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(("merged away" if mode == "merge" else "dropped") + " per block [8]") == len(images)
    for path in images:
        png = pics / (os.path.splitext(os.path.basename(path))[0] + ".png")
        pic = Image.open(png)
        assert pic.format == "PNG" and pic.size == pictures.picture_size(4, 10)
        assert len(pictures.outlined_cells(pic, 4, 10, pictures.LEVEL1_COLOUR)) == 3
        assert len(pictures.outlined_cells(pic, 4, 10, pictures.LEVEL2_COLOUR)) == 2
        arr = np.asarray(pic.convert("RGB"))
        grey = (arr == np.array(pictures.DROPPED_GREYS[0], dtype=np.uint8)).all(axis=-1)
        assert grey.sum() >= 8 * (10 - 2 * 3) ** 2  # 8 dropped (merged) cells greyed (at least their interiors)

    bad = subprocess.run(cmd[:cmd.index("--images") + 1] + ["missing.png"] + cmd[cmd.index("--out"):], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "image(s) not found: missing.png" in bad.stderr


def test_promptsrc_aggregates_prompts_and_resumes_the_aggregate_bit_identically(data_root, tiny_clip_path, tmp_path):
    """PromptSRC, 3 epochs, GPA around epoch 2: the final checkpoint holds the Gaussian-weighted sum of
    the three epochs' prompts (not the last epoch's); killed after epoch 1 and resumed, the run ends
    with the same aggregate, checkpoint tensors and result as an uninterrupted one."""
    from spotlighter.models import gpa_weights

    extra = ["OPTIM.MAX_EPOCH", "3", "TRAINER.PROMPTSRC.GPA_MEAN", "2", "TRAINER.PROMPTSRC.GPA_STD", "1",
             "TRAIN.CHECKPOINT_FREQ", "1"]
    ref, cut = tmp_path / "uninterrupted", tmp_path / "killed"
    run_train(data_root, tiny_clip_path, ref, trainer="PromptSRC", extra=extra)
    folder = ref / "VLPromptLearner"
    per_epoch = [torch.load(folder / f"model.pth.tar-{e}", weights_only=True) for e in (1, 2, 3)]
    final = per_epoch[2]
    w = gpa_weights(2, 1, 3)
    # epochs 1 and 2 are saved as trained; epoch 3's checkpoint holds the aggregate, whose last term is
    # the epoch-3 prompts, recovered from the aggregate of epochs 1-2 kept in epoch 2's trainer state
    agg2 = per_epoch[1]["trainer_state"]["gpa"]["sum"]
    for k, v in final["state_dict"].items():
        by_hand = per_epoch[0]["state_dict"][k] * w[0] + per_epoch[1]["state_dict"][k] * w[1]
        assert torch.equal(agg2[k], by_hand), k
        assert torch.equal(v, final["trainer_state"]["gpa"]["sum"][k]), k
        assert not torch.equal(v, per_epoch[1]["state_dict"][k]), k
    assert "Gaussian prompt aggregation (mean 2, std 1 over 3 epochs)" in open(ref / "log.txt").read()

    killed = run_train(data_root, tiny_clip_path, cut, trainer="PromptSRC", extra=extra, check=False,
                       env={"SPOTLIGHTER_TEST_KILL_AFTER_EPOCH": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_train(data_root, tiny_clip_path, cut, trainer="PromptSRC", extra=extra)
    a = dict(flat_tensors(torch.load(folder / "model.pth.tar-3", weights_only=True)))
    b = dict(flat_tensors(torch.load(cut / "VLPromptLearner" / "model.pth.tar-3", weights_only=True)))
    assert a.keys() == b.keys() and any(k.startswith("/trainer_state/gpa/sum/") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    ra, rb = read_result(ref), read_result(cut)
    assert (ra["correct"], ra["macro_f1"], ra["trainer"]) == (rb["correct"], rb["macro_f1"], "PromptSRC")


def test_promptsrc_teacher_file_named_model_best_loads(data_root, tiny_clip_path, tmp_path, capsys):
    """PromptKD publishes PromptSRC checkpoints renamed to VLPromptLearner/model-best.pth.tar, without
    Dassl's pointer file: --eval-only --model-dir reads that file; a checkpoint of another prompt depth
    names the differing keys and the config keys to set."""
    from original_ckpt import ivlp_original_state, save_original

    from spotlighter.backbone import FrozenCLIP, load_clip
    from spotlighter.models import PromptSRC

    clip = FrozenCLIP(load_clip("ViT-B/16", path=tiny_clip_path))
    model = PromptSRC(clip, ["a", "b"], n_text=4, n_vision=4, ctx_init="a photo of a", text_depth=2, vision_depth=2)
    path = save_original(tmp_path / "teacher", "VLPromptLearner", ivlp_original_state(model, True), epoch=20,
                         pointer=False)
    os.rename(path, tmp_path / "teacher" / "VLPromptLearner" / "model-best.pth.tar")
    argv = ["--eval-only", "--model-dir", str(tmp_path / "teacher")]
    code, err = run_in_process(argv + train_argv(data_root, tiny_clip_path, tmp_path / "e", trainer="PromptSRC"), capsys)
    assert code == 0, err
    log = open(tmp_path / "e" / "log.txt").read()
    assert "model-best.pth.tar was written by the original PromptSRC code: converted" in log
    assert read_result(tmp_path / "e")["epoch"] == 20
    code, err = run_in_process(argv + train_argv(data_root, tiny_clip_path, tmp_path / "f", trainer="PromptSRC",
                                                 extra=["TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "1"]), capsys)
    assert code == 2 and "Traceback" not in err
    assert "prompt_learner.visual_prompts.0: checkpoint [4, 64] vs config None" in err
    assert "TRAINER.PROMPTSRC.N_CTX_TEXT / N_CTX_VISION / PROMPT_DEPTH_TEXT / PROMPT_DEPTH_VISION" in err


def test_promptkd_distils_from_a_promptsrc_teacher_and_evaluates_new_classes(data_root, tiny_clip_path, tmp_path):
    """A PromptSRC teacher (wider tiny CLIP) trained here on base classes, a PromptKD student distilled
    on the unlabelled images of all classes, then evaluated on the new classes with the teacher's text."""
    from tiny_clip import save_tiny_clip

    teacher_clip = save_tiny_clip(tmp_path / "teacher_clip.pt", seed=4, vision_width=128, transformer_width=128,
                                  embed_dim=96)
    teacher = tmp_path / "teacher"
    run_train(data_root, teacher_clip, teacher, trainer="PromptSRC", extra=["OPTIM.MAX_EPOCH", "1"])
    kd = ["TRAINER.PROMPTKD.PROMPT_DEPTH_VISION", "2", "TRAINER.PROMPTKD.TEACHER", str(teacher),
          "TRAINER.PROMPTKD.TEACHER_PATH", teacher_clip, "TRAINER.PROMPTKD.TEACHER_PROMPT_DEPTH_TEXT", "2",
          "TRAINER.PROMPTKD.TEACHER_PROMPT_DEPTH_VISION", "2", "OPTIM.MAX_EPOCH", "1"]
    student = tmp_path / "student"
    run_train(data_root, tiny_clip_path, student, trainer="PromptKD", subset="all", extra=kd)
    log = open(student / "log.txt").read()
    assert f"Teacher: {teacher}/VLPromptLearner/model.pth.tar-1 (a PromptSRC checkpoint of this project)" in log
    # 2 visual prompts (4 x 64) + projector 64 -> 96 (convs, BatchNorm affine)
    assert "Trainable scalars: 16,256 in 8 tensors" in log
    assert " kd " in log and read_result(student)["total"] == 72
    new = tmp_path / "new"
    run_train(data_root, tiny_clip_path, new, trainer="PromptKD", subset="new", extra=kd, eval_only=True,
              model_dir=student)
    rec = read_result(new)
    assert rec["trainer"] == "PromptKD" and rec["subset"] == "new" and rec["total"] == 36 and rec["epoch"] == 1

    # Spotlighter on PromptKD (release) from the same teacher: its terms logged, its memory saved and used
    spot = tmp_path / "spot"
    run_train(data_root, tiny_clip_path, spot, trainer="SpotlighterKD", subset="all", extra=kd)
    log = open(spot / "log.txt").read()
    assert "Trainable student: 14 tensors, 32,000 scalars" in log  # 2 prompts + 2 projectors (6 tensors each)
    assert "Trainable memory: 9 tensors, 55,680 scalars" in log  # TRM 192 -> 96; IRM q, k, v, out 96 -> 96
    assert all(f" {term} " in log for term in ("kd", "sem", "level1", "level2", "mem", "img"))
    saved = torch.load(spot / "VLPromptLearner" / "model.pth.tar-1", weights_only=False)["state_dict"]
    assert saved["memory.slots"].shape == (25, 96)
    spot_new = tmp_path / "spot_new"
    run_train(data_root, tiny_clip_path, spot_new, trainer="SpotlighterKD", subset="new", extra=kd, eval_only=True,
              model_dir=spot)
    rec = read_result(spot_new)
    assert rec["trainer"] == "SpotlighterKD" and rec["total"] == 36 and rec["preset"] == "release"


# ------------------------------------------------------------------ resumes of the same run (issue 26)
def _interrupted(data_root, clip_path, out, trainer="CoOp"):
    """A run of ``trainer`` killed after its first epoch (a checkpoint, no result)."""
    killed = run_train(data_root, clip_path, out, trainer=trainer, check=False,
                       env={"SPOTLIGHTER_TEST_KILL_AFTER_EPOCH": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    return out / "prompt_learner" / "model.pth.tar-1"


def test_resume_with_other_settings_is_refused_and_restart_starts_over(data_root, tiny_clip_path, tmp_path,
                                                                        capsys):
    out = tmp_path / "job"
    kept = _interrupted(data_root, tiny_clip_path, out)
    before = kept.read_bytes()
    argv = train_argv(data_root, tiny_clip_path, out, trainer="CoOp",
                      extra=["OPTIM.LR", "0.01", "DATASET.NUM_SHOTS", "2", "OPTIM.MAX_EPOCH", "3",
                             "TRAIN.PRINT_FREQ", "7", "DATASET.SUBSAMPLE_CLASSES", "base"])
    argv[argv.index("--seed") + 1] = "2"
    code, err = run_in_process(argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: {out} holds a run (checkpoint {kept}, 1 epoch(s) done) with other settings than this command; "
        "resuming it would mix two runs. Differences (checkpoint -> now):",
        "  DATASET.NUM_SHOTS: 4 -> 2",
        "  OPTIM.LR: 0.002 -> 0.01",
        "  OPTIM.MAX_EPOCH: 2 -> 3",
        "  SEED: 1 -> 2",  # TRAIN.PRINT_FREQ changes no computation: not a difference
        "Either give this run another --output-dir (scripts/*.sh: another OUTPUT), or start over in this one "
        "with --restart (scripts/*.sh: FORCE=1), which moves the earlier run's files to "
        f"{out}/restarted/<time>/ (scripts/*.sh: to $OUTPUT/backup/)."]
    assert kept.read_bytes() == before and not (out / "result.json").exists()

    code, err = run_in_process(["--restart"] + argv, capsys)
    assert code == 0, err
    (moved,) = (out / "restarted").iterdir()
    assert (moved / "prompt_learner" / "model.pth.tar-1").read_bytes() == before
    assert (moved / "log.txt").is_file() and sorted(os.listdir(out / "prompt_learner")) == ["checkpoint",
                                                                                            "model.pth.tar-3"]
    log = open(out / "log.txt").read()
    # the killed run's log and the refused attempt's log.txt-<time> (which ends with the error above)
    assert re.search(r"--restart: moved the earlier run's files \(config\.yaml, log\.txt, log\.txt-[0-9-]+, "
                     r"prompt_learner, tensorboard\) to " + re.escape(str(moved)), log)
    assert "No checkpoint found" in log and "Resumed from" not in log
    rec = read_result(out)
    assert (rec["seed"], rec["shots"], rec["epoch"]) == (2, 2, 3)  # what ran


def test_resume_of_a_missing_or_empty_folder_is_an_error(data_root, tiny_clip_path, tmp_path, capsys):
    argv = train_argv(data_root, tiny_clip_path, tmp_path / "o", trainer="CoOp")
    code, err = run_in_process(["--resume", str(tmp_path / "nope")] + argv, capsys)
    assert code == 2 and err.strip() == (f"error: --resume {tmp_path / 'nope'}: no such folder. Give the output "
                                         "folder of the run to resume (a run started again with the same "
                                         "--output-dir resumes by itself).")
    (tmp_path / "empty").mkdir()
    code, err = run_in_process(["--resume", str(tmp_path / "empty")] + argv, capsys)
    assert code == 2 and err.strip() == (f"error: --resume {tmp_path / 'empty'}: no checkpoint to resume from "
                                         f"(expected {tmp_path / 'empty'}/prompt_learner/checkpoint, written by a "
                                         "training of this trainer).")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root, tiny_clip_path):
    """Reference runs of the signal tests, by DATALOADER.NUM_WORKERS."""
    refs = {}

    def get(workers):
        if workers not in refs:
            out = tmp_path_factory.mktemp("ref") / f"w{workers}"
            run_train(data_root, tiny_clip_path, out, extra=SIGNAL_RUN + ["DATALOADER.NUM_WORKERS", workers])
            refs[workers] = out
        return refs[workers]
    return get


SIGNAL_RUN = ["OPTIM.MAX_EPOCH", "3", "TEST.FINAL_MODEL", "best_val"]


@pytest.mark.parametrize("workers, signal_at, extra, expect", [
    ("0", "17:SIGUSR1", [], "after batch 5/12 of epoch 2"),  # mid-epoch: a step checkpoint
    ("2", "8:SIGTERM", [], "after batch 8/12 of epoch 1"),  # worker processes: their batches are remade
    # the epoch's last step: the stop comes after its val test, and writes the epoch's checkpoint itself
    ("0", "24:SIGUSR1", ["TRAIN.RESUMABLE_EVERY_EPOCH", "False"], "after epoch 2"),
])
def test_stop_signal_checkpoints_and_the_resume_is_bit_identical(workers, signal_at, extra, expect, uninterrupted,
                                                                 data_root, tiny_clip_path, tmp_path):
    """SIGUSR1/SIGTERM: the step finishes, a resumable checkpoint is written, exit status 75; the
    re-run resumes and equals an uninterrupted run in every saved tensor, every later log line
    (running averages included) and its result."""
    ref = uninterrupted(workers)
    out = tmp_path / "stopped"
    run = SIGNAL_RUN + ["DATALOADER.NUM_WORKERS", workers] + extra
    stopped = run_train(data_root, tiny_clip_path, out, extra=run, check=False,
                        env={"SPOTLIGHTER_TEST_SIGNAL_AFTER_STEP": signal_at})
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    step = int(signal_at.split(":")[0])
    name = f"model.pth.tar-{(step - 1) // 12 + 1}-step{(step - 1) % 12 + 1}" if step % 12 else f"model.pth.tar-{step // 12}"
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"stopped: by {signal_at.split(':')[1]} {expect}; the checkpoint to resume from is named by "
        f"{out}/spotlighter/checkpoint. Re-run the same command to resume (scripts/*.sh skip finished jobs and "
        "resume this one).")
    assert (out / "spotlighter" / "checkpoint").read_text().strip() == name
    assert not (out / "result.json").exists()
    def after_stop(lines):  # (epoch, batch) past the stop
        return [l for l in lines if tuple(map(int, re.findall(r"\[(\d+)/", l)[:2])) > (step // 12 + 1, step % 12)]

    assert epoch_lines(stopped.stdout, 1) and after_stop(epoch_lines(stopped.stdout, 1)) == []  # stopped there

    resumed = run_train(data_root, tiny_clip_path, out, extra=run)
    assert f"Resumed from {out}/spotlighter/{name}" in resumed.stdout
    assert sorted(os.listdir(out / "spotlighter")) == ["checkpoint", "model-best.pth.tar", "model.pth.tar-3"]
    ref_log = open(ref / "log.txt").read()
    first = step // 12 + 1
    assert epoch_lines(resumed.stdout, first) == after_stop(epoch_lines(ref_log, first))
    assert len(after_stop(epoch_lines(ref_log, first))) >= 2
    for f in ("model.pth.tar-3", "model-best.pth.tar"):
        a = dict(flat_tensors(torch.load(ref / "spotlighter" / f, weights_only=True)))
        b = dict(flat_tensors(torch.load(out / "spotlighter" / f, weights_only=True)))
        assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == [], f
    ra, rb = read_result(ref), read_result(out)
    assert (ra["correct"], ra["macro_f1"], ra["epoch"]) == (rb["correct"], rb["macro_f1"], rb["epoch"])


def test_time_limit_warning_before_the_first_step_is_ignored(data_root, tiny_clip_path, tmp_path, capsys,
                                                             monkeypatch):
    """SIGUSR1 before this process trained a step (SLURM can repeat the warning right after it restarts
    a requeued job): stopping would requeue a job that makes no progress, so training goes on."""
    import signal

    from trainers.base import PromptTrainer

    before_train = PromptTrainer.before_train

    def signalled(self):
        before_train(self)
        os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(PromptTrainer, "before_train", signalled)
    out = tmp_path / "early"
    code, err = run_in_process(train_argv(data_root, tiny_clip_path, out, trainer="CoOp",
                                          extra=["OPTIM.MAX_EPOCH", "1"]), capsys)
    assert code == 0, err
    log = open(out / "log.txt").read()
    assert ("SIGUSR1 before this process trained a step: ignored (a job requeued on it would make no progress); "
            "training goes on") in log
    assert read_result(out)["epoch"] == 1


def test_full_disk_while_logging_is_one_line(data_root, tiny_clip_path, tmp_path, capsys, monkeypatch):
    """log.txt cannot take a logged message: the run stops with one line, not a logging traceback
    for every message that follows."""
    import errno

    from dassl.utils import logger as dassl_logger

    original = dassl_logger.Logger.write

    def write(self, msg):
        if self.file is not None and "Reading split from" in msg:  # the first message logged by `logging`
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.fpath if hasattr(self, "fpath") else
                          str(tmp_path / "full" / "log.txt"))
        return original(self, msg)

    monkeypatch.setattr(dassl_logger.Logger, "write", write)
    out = tmp_path / "full"
    code, err = run_in_process(train_argv(data_root, tiny_clip_path, out, trainer="CoOp"), capsys)
    assert code == 2 and "Logging error" not in err and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: cannot write {out}/log.txt (No space left on device): free space "
                                        "on that file system (or raise the quota), or give another --output-dir."]
