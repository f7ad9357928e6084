"""spotlighter.checkpoint: safe format, bit-exact round trip, refusal messages, atomic writes, size."""

import os
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from conftest import requires_dassl
from spotlighter import checkpoint as ckpt
from spotlighter.checkpoint import FORMAT, CheckpointError, load, save, trainable_state
from spotlighter.config import apply_preset, default_cfg
from spotlighter.method import ClassMemory, HeadConfig, SpotlighterHead
from spotlighter.models import count_trainable
from spotlighter.schedule import EpochLRSchedule

MB = 1024 * 1024


class NotATensor:
    """A custom class: a pickle of it must not be loadable with weights_only=True."""

    def __init__(self):
        self.x = 1


def payload(**overrides):
    g = torch.Generator().manual_seed(0)
    base = {
        "trainer": "Spotlighter", "preset": "paper",
        "signature": {"prompt_learner.ctx": [4, 8], "head.trm.proj.weight": [8, 16]},
        "state_dict": OrderedDict([
            ("prompt_learner.ctx", torch.randn(4, 8, generator=g)),
            ("head.trm.proj.weight", torch.randn(8, 16, generator=g)),
            ("half", torch.randn(3, generator=g).half()),
            ("bn.num_batches_tracked", torch.tensor(7)),
            ("mask", torch.tensor([True, False])),
        ]),
        "class_state": {"classnames": ["a", "b"], "prototypes": torch.randn(2, 4, 8, generator=g)},
        "optimizer": None, "scheduler": {"last_epoch": 3, "base_lrs": [0.002]},
        "epoch": 3, "val_result": 71.25,
    }
    base.update(overrides)
    return base


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_bit_exact(tmp_path):
    p = payload()
    path = str(tmp_path / "model.pth.tar-3")
    save(path, p)
    back = load(path, trainer="Spotlighter", preset="paper", signature=p["signature"])
    assert back["format"] == FORMAT
    assert_same({k: back[k] for k in p}, p)
    raw = torch.load(path, weights_only=True)  # readable by anyone, safely
    assert raw["format"] == FORMAT
    assert_same(raw["state_dict"], p["state_dict"])


def test_round_trip_with_real_optimizer_and_schedule(tmp_path):
    model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    sched = EpochLRSchedule(opt, name="cosine", max_epoch=20)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    sched.step()
    path = str(tmp_path / "m.pth")
    save(path, {"trainer": "CoOp", "preset": None, "state_dict": trainable_state(model),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    back = load(path, trainer="CoOp")
    fresh = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    fresh.load_state_dict(back["state_dict"])
    assert_same(fresh.state_dict(), model.state_dict())
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    fresh_opt.load_state_dict(back["optimizer"])
    for p_old, p_new in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(opt.state[p_old]["momentum_buffer"], fresh_opt.state[p_new]["momentum_buffer"])
    fresh_sched = EpochLRSchedule(fresh_opt, name="cosine", max_epoch=20)
    fresh_sched.load_state_dict(back["scheduler"])
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_class_state_round_trip_maps_by_name(tmp_path):
    mem = ClassMemory(torch.randn(3, 8), ["a", "b", "c"], 4, 0.8, 0.1)
    mem.write(torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(6))
    path = str(tmp_path / "m.pth")
    save(path, payload(class_state=mem.class_state()))
    back = load(path, trainer="Spotlighter")
    new = ClassMemory(torch.randn(2, 8), ["c", "z"], 4, 0.8, 0.1)
    z_init = new.prototypes[1].clone()
    assert new.load_class_state(back["class_state"]) == (1, 1)
    assert torch.equal(new.prototypes[0], mem.prototypes[2])
    assert torch.equal(new.prototypes[1], z_init)


def test_trainable_state_detached_cpu_copies_without_nonpersistent():
    m = nn.Linear(2, 2)
    m.register_buffer("token_prefix", torch.ones(3), persistent=False)
    m.register_buffer("slots", torch.ones(4))
    state = trainable_state(m)
    assert list(state) == ["weight", "bias", "slots"]
    assert not any(v.requires_grad for v in state.values())
    assert torch.equal(state["weight"], m.weight.detach())


# ----------------------------------------------------------------------------- refusals
def saved(tmp_path, **overrides):
    path = str(tmp_path / "ckpt.pth")
    save(path, payload(**overrides))
    return path


def test_other_trainer(tmp_path):
    path = saved(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load(path, trainer="CoOp")
    assert "'Spotlighter'" in str(err.value) and "'CoOp'" in str(err.value)


def test_other_preset(tmp_path):
    path = saved(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load(path, trainer="Spotlighter", preset="release")
    msg = str(err.value)
    assert "TRAINER.SPOTLIGHTER.PRESET" in msg and "'paper'" in msg and "'release'" in msg
    assert load(path, trainer="Spotlighter")["preset"] == "paper"  # preset None: not checked


def test_signature_mismatch_names_key_and_both_shapes(tmp_path):
    path = saved(tmp_path)
    sig = {"prompt_learner.ctx": [2, 8], "head.trm.proj.weight": [8, 16]}
    with pytest.raises(CheckpointError) as err:
        load(path, trainer="Spotlighter", preset="paper", signature=sig)
    msg = str(err.value)
    assert "prompt_learner.ctx" in msg and "[4, 8]" in msg and "[2, 8]" in msg
    assert "head.trm.proj.weight" not in msg  # only the differing key
    with pytest.raises(CheckpointError, match="new.key: checkpoint None vs config \\[3\\]"):
        load(path, trainer="Spotlighter", signature={"new.key": [3]})


def test_plain_dict_is_not_ours(tmp_path):
    path = str(tmp_path / "plain.pth")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="is not a spotlighter-ckpt/1 checkpoint"):
        load(path, trainer="Spotlighter")
    torch.save({"format": "spotlighter-ckpt/0", "trainer": "Spotlighter"}, path)
    with pytest.raises(CheckpointError, match="is not a spotlighter-ckpt/1 checkpoint"):
        load(path, trainer="Spotlighter")
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="is not a spotlighter-ckpt/1 checkpoint"):
        load(path, trainer="Spotlighter")


def test_pickled_object_cannot_be_read_safely(tmp_path):
    path = str(tmp_path / "pickled.pth")
    torch.save({"format": FORMAT, "trainer": "Spotlighter", "model": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="is a pickle of Python objects, not plain tensors") as err:
        load(path, trainer="Spotlighter")
    assert path in str(err.value) and "weights_only" not in str(err.value)


@pytest.mark.parametrize("damage, message", [
    (lambda data: b"", "is empty (0 bytes)"),
    (lambda data: data[: len(data) // 2], "is truncated or corrupt"),
    (lambda data: data[:100], "is truncated or corrupt"),
    (lambda data: b"PK" + b"garbage" * 20, "is not a torch file"),
])
def test_damaged_checkpoint_is_named_for_what_it_is(tmp_path, damage, message):
    path = str(tmp_path / "model.pth.tar-2")
    save(path, {"trainer": "CoOp", "state_dict": {"w": torch.randn(64, 64)}})
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    with pytest.raises(CheckpointError) as err:
        load(path, trainer="CoOp")
    text = str(err.value)
    assert text.startswith(f"{path} {message}") and "Delete it and retrain" in text
    assert "weights_only" not in text and "not a checkpoint of this project" not in text


def test_full_disk_on_save_is_an_output_error(tmp_path, monkeypatch):
    import errno

    from spotlighter.fileio import OutputWriteError

    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full)
    path = str(tmp_path / "prompt_learner" / "model.pth.tar-1")
    with pytest.raises(OutputWriteError, match=r"\(No space left on device\): free space on that file system"):
        save(path, {"trainer": "CoOp"})
    assert os.listdir(tmp_path / "prompt_learner") == []  # no partial file left


def test_whole_module_pickle_is_refused(tmp_path):
    """What other codebases (and the released code) save: a pickled module."""
    path = str(tmp_path / "module.pth")
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError, match="is a pickle of Python objects"):
        load(path, trainer="Spotlighter")


def test_missing_file(tmp_path):
    path = str(tmp_path / "none" / "model.pth.tar-20")
    with pytest.raises(CheckpointError, match="No checkpoint at") as err:
        load(path, trainer="Spotlighter")
    assert path in str(err.value)


# ----------------------------------------------------------------------------- atomic writes
def test_save_leaves_no_temp_file_and_overwrites(tmp_path):
    path = str(tmp_path / "sub" / "model.pth.tar-1")
    save(path, payload(epoch=1))
    save(path, payload(epoch=2))
    assert os.listdir(tmp_path / "sub") == ["model.pth.tar-1"]
    assert load(path, trainer="Spotlighter")["epoch"] == 2


def _failing_save(obj, f, *args, **kwargs):
    with open(f, "wb") as handle:
        handle.write(b"PK\x03\x04 half written")
    raise OSError(28, "No space left on device")


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = saved(tmp_path, epoch=5)
    monkeypatch.setattr(ckpt.torch, "save", _failing_save)
    with pytest.raises(OSError):
        save(path, payload(epoch=6))
    monkeypatch.undo()
    assert load(path, trainer="Spotlighter")["epoch"] == 5


def test_interrupted_save_leaves_no_temp_file(tmp_path, monkeypatch):
    path = saved(tmp_path, epoch=5)
    monkeypatch.setattr(ckpt.torch, "save", _failing_save)
    with pytest.raises(OSError):
        save(path, payload(epoch=6))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]


# ----------------------------------------------------------------------------- size
def spot_node(preset):
    cfg = default_cfg()
    apply_preset(cfg, preset)
    return cfg.TRAINER.SPOTLIGHTER


class RealSize(nn.Module):
    """The trainable part of CoOp w/ Spotlighter at ViT-B/16 size: 4 x 512 context + head at d = 512."""

    def __init__(self, preset, n_cls):
        super().__init__()
        self.ctx = nn.Parameter(torch.randn(4, 512) * 0.02)
        names = [f"class_{i}" for i in range(n_cls)]
        self.head = SpotlighterHead(HeadConfig.from_cfg(spot_node(preset)), 512, names, torch.randn(n_cls, 512))


def real_size_file(tmp_path, preset, n_cls, with_class_state=True):
    torch.manual_seed(0)
    model = RealSize(preset, n_cls)
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # creates the momentum buffers
    memory = model.head.memory
    class_state = memory.class_state() if (with_class_state and isinstance(memory, ClassMemory)) else None
    path = str(tmp_path / f"{preset}-{n_cls}.pth")
    save(path, {"trainer": "Spotlighter", "preset": preset,
                "signature": {k: list(v.shape) for k, v in model.state_dict().items()},
                "state_dict": trainable_state(model), "class_state": class_state,
                "optimizer": opt.state_dict(), "scheduler": None, "epoch": 20, "val_result": None})
    return path, model


@pytest.mark.parametrize("preset", ["paper", "release"])
def test_real_size_checkpoint_is_small_and_clip_free(tmp_path, preset):
    n_cls = 50
    path, model = real_size_file(tmp_path, preset, n_cls)
    size = os.path.getsize(path)
    assert size < 20 * MB, size
    data = load(path, trainer="Spotlighter", preset=preset)
    keys = list(data["state_dict"])
    assert not [k for k in keys if any(s in k for s in ("visual", "transformer", "token_embedding"))]
    trainable = count_trainable(model)
    assert trainable == 2_103_296
    saved_scalars = sum(v.numel() for v in data["state_dict"].values())
    buffers = sum(b.numel() for n, b in model.named_buffers() if n in model.state_dict())
    assert saved_scalars == trainable + buffers  # parameters and persistent buffers, nothing else
    momentum = sum(s["momentum_buffer"].numel() for s in data["optimizer"]["state"].values())
    assert momentum == trainable
    protos = 0 if data["class_state"] is None else data["class_state"]["prototypes"].numel()
    assert protos == (n_cls * 4 * 512 if preset == "paper" else 0)
    # the file is essentially its float32 scalars: no hidden extra weights
    assert size < 4 * (saved_scalars + momentum + protos) + 1 * MB


# ------------------------------------------------------------------ the settings that define a run
def _dassl_cfg():
    return default_cfg()


@requires_dassl
def test_run_settings_hold_the_keys_that_change_the_computation():
    cfg = _dassl_cfg()
    s = ckpt.run_settings(cfg, "COOP")
    for key in ("SEED", "DATASET.NUM_SHOTS", "DATASET.SUBSAMPLE_CLASSES", "DATASET.NAME", "OPTIM.LR",
                "OPTIM.MAX_EPOCH", "MODEL.BACKBONE.NAME", "MODEL.PRUNE.KEEP", "INPUT.SIZE",
                "DATALOADER.TRAIN_X.BATCH_SIZE", "TRAINER.NAME", "TRAINER.COOP.N_CTX", "TEST.FINAL_MODEL"):
        assert key in s, key
    for key in ckpt.UNCHECKED_KEYS:  # where it writes, how often it prints or keeps extra checkpoints
        assert key not in s, key
    assert not any(k.startswith(("TRAINER.MAPLE.", "TRAINER.SPOTLIGHTER.")) for k in s)  # other trainers' nodes
    assert s["INPUT.SIZE"] == [224, 224] and s["MODEL.PRUNE.LAYERS"] == []  # tuples as lists, plain values
    assert ckpt.settings_diff(s, s) == {}
    cfg.OPTIM.LR, cfg.SEED, cfg.OUTPUT_DIR, cfg.TRAIN.PRINT_FREQ = 0.5, 7, "elsewhere", 99
    assert ckpt.settings_diff(s, ckpt.run_settings(cfg, "COOP")) == {"OPTIM.LR": (s["OPTIM.LR"], 0.5),
                                                                      "SEED": (s["SEED"], 7)}
    # a key that only one side knows (another version of the code) is no difference of the run
    assert ckpt.settings_diff({**s, "GONE": 1}, {**s, "NEW": 2}) == {}


def test_load_with_other_settings_names_every_difference(tmp_path):
    path = str(tmp_path / "m.pth.tar")
    save(path, payload(settings={"SEED": 1, "OPTIM.LR": 0.002, "INPUT.SIZE": [224, 224]}))
    assert load(path, trainer="Spotlighter", settings={"SEED": 1, "OPTIM.LR": 0.002, "INPUT.SIZE": [224, 224]})
    with pytest.raises(ckpt.SettingsChanged) as exc:
        load(path, trainer="CoOp", settings={"SEED": 2, "OPTIM.LR": 0.002, "INPUT.SIZE": [32, 32]})
    assert exc.value.diff == {"INPUT.SIZE": ([224, 224], [32, 32]), "SEED": (1, 2)}  # before the trainer check
    assert str(exc.value) == f"{path} was written by a run with other settings: INPUT.SIZE: [224, 224] -> [32, 32]; SEED: 1 -> 2"


def test_non_finite_names_the_tensors():
    state = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("inf")]).half(),
             "n": torch.tensor([3])}
    assert ckpt.non_finite(state) == ["b", "c"]
