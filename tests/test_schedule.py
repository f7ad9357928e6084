"""spotlighter.schedule: epoch-wise LR values (Dassl's warm-up + cosine), state round trip, errors."""

import math

import pytest
import torch
from yacs.config import CfgNode as CN

from spotlighter.schedule import EpochLRSchedule, build_schedule

# torch warns when a scheduler steps before any optimizer step; irrelevant here.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")

LR = 0.002
MAX_EPOCH = 20


def optim(lr: float = LR) -> torch.optim.Optimizer:
    p = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([p], lr=lr, momentum=0.9)


def optim_node(**kw) -> CN:
    """An OPTIM node with Dassl's key names and defaults (dassl/config/defaults.py)."""
    node = CN()
    node.LR_SCHEDULER = "cosine"
    node.MAX_EPOCH = MAX_EPOCH
    node.WARMUP_EPOCH = -1
    node.WARMUP_TYPE = "linear"
    node.WARMUP_CONS_LR = 1e-5
    node.WARMUP_MIN_LR = 1e-5
    node.STEPSIZE = (-1,)
    node.GAMMA = 0.1
    node.WARMUP_RECOUNT = True
    for k, v in kw.items():
        node[k] = v
    return node


def lrs(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        sched.step()
    return out


def cosine(t):
    return LR * (1 + math.cos(math.pi * t / MAX_EPOCH)) / 2


# ----------------------------------------------------------------------------- a Dassl reference
# Dassl's warm-up wrappers (dassl/optim/lr_scheduler.py), minus the ``verbose`` argument that
# current torch removed. Dassl itself is not imported (CI has none).
class _DasslWarmup(torch.optim.lr_scheduler.LRScheduler):
    def __init__(self, optimizer, successor, warmup_epoch, kind, lr):
        self.successor, self.warmup_epoch, self.kind, self.warm_lr = successor, warmup_epoch, kind, lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        if self.kind == "constant" or self.last_epoch == 0:
            return [self.warm_lr for _ in self.base_lrs]
        return [lr * self.last_epoch / self.warmup_epoch for lr in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step()
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step()


def dassl_lrs(n, warmup_epoch, kind, warm_lr, recount=True):
    opt = optim()
    succ = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(MAX_EPOCH))
    if warmup_epoch and not recount:  # dassl build_lr_scheduler: WARMUP_RECOUNT False
        succ.last_epoch = warmup_epoch
    sched = _DasslWarmup(opt, succ, warmup_epoch, kind, warm_lr) if warmup_epoch else succ
    return lrs(sched, opt, n)


# ----------------------------------------------------------------------------- without warm-up
def test_cosine_without_warmup_matches_torch_step_by_step():
    opt_a, opt_b = optim(), optim()
    ours = EpochLRSchedule(opt_a, name="cosine", max_epoch=MAX_EPOCH)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=MAX_EPOCH)
    got, want = lrs(ours, opt_a, MAX_EPOCH + 1), lrs(ref, opt_b, MAX_EPOCH + 1)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64))
    assert got[0] == LR and got[MAX_EPOCH // 2] == pytest.approx(LR / 2) and got[MAX_EPOCH] == pytest.approx(0.0)


def test_build_schedule_without_warmup_is_plain_cosine():
    opt = optim()
    got = lrs(build_schedule(opt, optim_node(WARMUP_EPOCH=0)), opt, MAX_EPOCH)
    assert got == pytest.approx([cosine(e) for e in range(MAX_EPOCH)], rel=1e-12, abs=1e-15)
    opt = optim()
    got_neg = lrs(build_schedule(opt, optim_node(WARMUP_EPOCH=-1)), opt, MAX_EPOCH)  # Dassl's default -1
    assert got_neg == got


# ----------------------------------------------------------------------------- with warm-up
def test_constant_warmup_epoch_zero_then_cosine_decreasing():
    opt = optim()
    sched = build_schedule(opt, optim_node(WARMUP_EPOCH=1, WARMUP_TYPE="constant"))
    got = lrs(sched, opt, MAX_EPOCH)
    assert got[0] == 1e-5
    assert all(a > b for a, b in zip(got[1:], got[2:]))  # strictly decreasing after warm-up
    assert all(0 < v <= LR for v in got[1:])


def test_constant_warmup_matches_dassl_hand_computed():
    """Dassl (run on its own lr_scheduler.py): epoch 0 = 1e-5, epoch 1 = 0.002, epoch e = cos(pi*(e-1)/20)."""
    opt = optim()
    got = lrs(build_schedule(opt, optim_node(WARMUP_EPOCH=1, WARMUP_TYPE="constant")), opt, MAX_EPOCH)
    want = [1e-5] + [cosine(e - 1) for e in range(1, MAX_EPOCH)]
    assert got[1] == LR  # the full LR in the first epoch after warm-up (CoOp logs: "epoch [2/..] lr 2.0000e-03")
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("kind, warmup", [("constant", 1), ("linear", 3)])
def test_warmup_matches_dassl_reference(kind, warmup):
    opt = optim()
    node = optim_node(WARMUP_EPOCH=warmup, WARMUP_TYPE=kind)
    got = lrs(build_schedule(opt, node), opt, MAX_EPOCH)
    want = dassl_lrs(MAX_EPOCH, warmup, kind, 1e-5)
    assert got == pytest.approx(want, rel=1e-12)


def test_dassl_reference_sanity():
    """The reference itself against hand-computed values of Dassl's constant warm-up (checked once
    against dassl/optim/lr_scheduler.py run with the verbose argument removed)."""
    got = dassl_lrs(MAX_EPOCH, 1, "constant", 1e-5)
    assert got[0] == 1e-5 and got[1] == LR
    assert got[2:] == pytest.approx([cosine(e - 1) for e in range(2, MAX_EPOCH)], rel=1e-12)


def test_dassl_reference_without_recount_sanity():
    """WARMUP_RECOUNT False: Dassl sets the successor's last_epoch to W, hands over at the base LR and
    then steps torch's chained cosine, so lr(e) = base * (1 + cos(pi e / T)) / (1 + cos(pi W / T))."""
    got = dassl_lrs(MAX_EPOCH, 1, "constant", 1e-5, recount=False)
    scale = 1 + math.cos(math.pi / MAX_EPOCH)
    want = [1e-5] + [LR * (1 + math.cos(math.pi * e / MAX_EPOCH)) / scale for e in range(1, MAX_EPOCH)]
    assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("kind, warmup", [("constant", 1), ("linear", 3)])
def test_warmup_without_recount_matches_dassl_reference(kind, warmup):
    opt = optim()
    node = optim_node(WARMUP_EPOCH=warmup, WARMUP_TYPE=kind, WARMUP_RECOUNT=False)
    got = lrs(build_schedule(opt, node), opt, MAX_EPOCH)
    assert got == pytest.approx(dassl_lrs(MAX_EPOCH, warmup, kind, 1e-5, recount=False), rel=1e-9)


def test_linear_warmup_values():
    opt = optim()
    sched = build_schedule(opt, optim_node(WARMUP_EPOCH=4, WARMUP_TYPE="linear", WARMUP_MIN_LR=1e-6))
    got = lrs(sched, opt, 6)
    assert got[:4] == pytest.approx([1e-6, LR * 1 / 4, LR * 2 / 4, LR * 3 / 4], rel=1e-12)
    assert got[3] < got[4] <= LR  # the cosine starts at (or just below) the base LR
    assert got[5] < got[4]


def test_single_step_matches_torch_steplr():
    opt_a, opt_b = optim(), optim()
    ours = build_schedule(opt_a, optim_node(LR_SCHEDULER="single_step", STEPSIZE=[5], GAMMA=0.5,
                                            WARMUP_EPOCH=0))
    ref = torch.optim.lr_scheduler.StepLR(opt_b, step_size=5, gamma=0.5)
    got, want = lrs(ours, opt_a, 16), lrs(ref, opt_b, 16)
    assert got == pytest.approx(want, rel=1e-12)
    assert got[4] == LR and got[5] == LR / 2 and got[15] == LR / 8


def test_single_step_nonpositive_stepsize_means_max_epoch():
    opt = optim()
    got = lrs(build_schedule(opt, optim_node(LR_SCHEDULER="single_step", STEPSIZE=[-1], WARMUP_EPOCH=0)),
              opt, MAX_EPOCH + 1)
    assert got[MAX_EPOCH - 1] == LR and got[MAX_EPOCH] == pytest.approx(LR * 0.1)


def test_multi_step_matches_torch():
    opt_a, opt_b = optim(), optim()
    ours = build_schedule(opt_a, optim_node(LR_SCHEDULER="multi_step", STEPSIZE=[3, 7], WARMUP_EPOCH=0))
    ref = torch.optim.lr_scheduler.MultiStepLR(opt_b, milestones=[3, 7], gamma=0.1)
    assert lrs(ours, opt_a, 10) == pytest.approx(lrs(ref, opt_b, 10), rel=1e-12)


def test_state_dict_round_trip_restores_lr_of_a_fresh_optimizer():
    opt = optim()
    sched = build_schedule(opt, optim_node(WARMUP_EPOCH=1, WARMUP_TYPE="constant"))
    for _ in range(7):
        sched.step()
    state = sched.state_dict()
    lr7 = opt.param_groups[0]["lr"]
    assert lr7 != LR

    fresh_opt = optim()
    fresh = build_schedule(fresh_opt, optim_node(WARMUP_EPOCH=1, WARMUP_TYPE="constant"))
    assert fresh_opt.param_groups[0]["lr"] == 1e-5
    fresh.load_state_dict(state)
    assert fresh_opt.param_groups[0]["lr"] == lr7
    assert fresh.last_epoch == 7
    sched.step()
    fresh.step()
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_state_dict_is_plain_and_safe(tmp_path):
    opt = optim()
    sched = EpochLRSchedule(opt, name="cosine", max_epoch=MAX_EPOCH)
    sched.step()
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    back = torch.load(tmp_path / "s.pt", weights_only=True)
    assert back == {"last_epoch": 1, "base_lrs": [LR]}


def test_optimizer_resumed_with_initial_lr_keeps_base_lr():
    """A second schedule on the same optimizer (resume) must take the base LR, not the decayed one."""
    opt = optim()
    sched = EpochLRSchedule(opt, name="cosine", max_epoch=MAX_EPOCH)
    for _ in range(5):
        sched.step()
    again = EpochLRSchedule(opt, name="cosine", max_epoch=MAX_EPOCH)
    assert again.base_lrs == [LR]


def test_invalid_scheduler_name():
    with pytest.raises(ValueError, match="OPTIM.LR_SCHEDULER") as err:
        build_schedule(optim(), optim_node(LR_SCHEDULER="cosine_restarts"))
    assert "'cosine_restarts'" in str(err.value) and "cosine" in str(err.value)


def test_invalid_warmup_type_and_max_epoch():
    with pytest.raises(ValueError, match="OPTIM.WARMUP_TYPE"):
        build_schedule(optim(), optim_node(WARMUP_EPOCH=1, WARMUP_TYPE="exp"))
    with pytest.raises(ValueError, match="OPTIM.MAX_EPOCH"):
        build_schedule(optim(), optim_node(MAX_EPOCH=0))
