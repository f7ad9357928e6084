"""Warm-up + main LR schedule built from ``cfg.OPTIM``, with a plain state dict.

Upstream Dassl's warm-up scheduler passes ``verbose`` positionally to torch's LR scheduler, which
torch >= 2.7 removed; this replaces it. The epoch-wise values reproduce Dassl's: during the warm-up
epochs the LR is constant (``WARMUP_CONS_LR``) or linear from ``WARMUP_MIN_LR``; afterwards the main
schedule continues as Dassl's successor scheduler does: the first epoch after warm-up runs at the
successor's step 0 (the base LR for cosine), as CoOp's logs show ("epoch [2/..] lr 2.0000e-03").
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch

SCHEDULERS = ("cosine", "single_step", "multi_step", "constant")
WARMUP_TYPES = ("constant", "linear")


class EpochLRSchedule:
    """Sets the optimizer's LR per epoch. ``step()`` once at the end of each epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, name: str = "cosine", max_epoch: int,
                 warmup_epoch: int = 0, warmup_type: str = "constant", warmup_cons_lr: float = 1e-5,
                 warmup_min_lr: float = 1e-5, stepsize: List[int] | int = (10,), gamma: float = 0.1,
                 eta_min: float = 0.0, warmup_recount: bool = True):
        if name not in SCHEDULERS:
            raise ValueError(f"OPTIM.LR_SCHEDULER = {name!r}: expected one of {list(SCHEDULERS)}")
        if warmup_epoch > 0 and warmup_type not in WARMUP_TYPES:
            raise ValueError(f"OPTIM.WARMUP_TYPE = {warmup_type!r}: expected one of {list(WARMUP_TYPES)}")
        if max_epoch < 1:
            raise ValueError(f"OPTIM.MAX_EPOCH = {max_epoch}: expected an integer >= 1")
        self.optimizer = optimizer
        self.name = name
        self.max_epoch = max_epoch
        self.warmup_epoch = warmup_epoch
        self.warmup_type = warmup_type
        self.warmup_cons_lr = warmup_cons_lr
        self.warmup_min_lr = warmup_min_lr
        self.stepsize = [stepsize] if isinstance(stepsize, int) else list(stepsize)
        self.gamma = gamma
        self.eta_min = eta_min
        self.warmup_recount = warmup_recount
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self.last_epoch = 0
        self._apply()

    def lr_at(self, epoch: int, base_lr: float) -> float:
        if epoch < self.warmup_epoch:
            if self.warmup_type == "constant":
                return self.warmup_cons_lr
            return self.warmup_min_lr if epoch == 0 else base_lr * epoch / self.warmup_epoch
        if self.warmup_epoch == 0:
            t = epoch
        else:  # Dassl's wrapper hands over at the successor's step 0 (the base LR), then steps it
            t = (epoch - self.warmup_epoch) if self.warmup_recount else epoch
        if self.name == "cosine":
            if self.warmup_epoch and not self.warmup_recount:
                # Dassl sets the successor's last_epoch to W; torch's chainable cosine then rescales
                # from the base LR held at epoch W.
                w = math.cos(math.pi * self.warmup_epoch / self.max_epoch)
                return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.max_epoch)) / (1 + w)
            return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * t / self.max_epoch)) / 2
        if self.name == "single_step":
            size = self.stepsize[-1] if self.stepsize[-1] > 0 else self.max_epoch
            return base_lr * self.gamma ** (t // size)
        if self.name == "multi_step":
            return base_lr * self.gamma ** sum(t >= s for s in self.stepsize)
        return base_lr

    def _apply(self) -> None:
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = self.lr_at(self.last_epoch, base)

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, object]:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        self._apply()


def build_schedule(optimizer: torch.optim.Optimizer, optim_cfg) -> EpochLRSchedule:
    """From a Dassl ``cfg.OPTIM`` node."""
    warmup = int(optim_cfg.WARMUP_EPOCH) if optim_cfg.WARMUP_EPOCH and optim_cfg.WARMUP_EPOCH > 0 else 0
    return EpochLRSchedule(
        optimizer, name=optim_cfg.LR_SCHEDULER, max_epoch=int(optim_cfg.MAX_EPOCH),
        warmup_epoch=warmup, warmup_type=optim_cfg.WARMUP_TYPE,
        warmup_cons_lr=float(optim_cfg.WARMUP_CONS_LR), warmup_min_lr=float(optim_cfg.WARMUP_MIN_LR),
        stepsize=list(optim_cfg.STEPSIZE), gamma=float(optim_cfg.GAMMA),
        warmup_recount=bool(optim_cfg.WARMUP_RECOUNT),
    )
