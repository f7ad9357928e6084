"""Fast headroom probe of a prepared MiniBench: zero-shot, a few-shot linear probe and a CoOp proxy.

``python -m spotlighter.benchmark calibrate --root DATA`` prints, on MiniBench's test split, the
zero-shot accuracy (base among base classes, new among new classes), a 16-shot logistic-regression
probe on the frozen image features (an upper-bound indicator of what few-shot adaptation can
gain on base), and a CoOp proxy: the project's own :class:`spotlighter.models.CoOp` prompt learner
trained in-process on the base classes' K-shot images with a CoOp config's context and schedule (by
default the one the demo runs, :data:`DEFAULT_COOP_CONFIG`: SGD, cosine, batch 32) but without
augmentation and with precomputed image features, then
tested on base and new. It is a calibration instrument only (seconds instead of minutes); the
numbers of record come from the real trainers (``scripts/base2new.sh``).

Only ZS-CLIP- and CoOp-like quantities are computed here, on purpose: the benchmark's design is
calibrated on those, never on Spotlighter.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import registry
from . import data, pretrain


def _features(model, paths: Sequence[str]) -> torch.Tensor:
    return pretrain.encode_images(model, paths)


def _kshot(items, labels_wanted, k: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for c in labels_wanted:
        idx = [i for i, it in enumerate(items) if it[1] == c]
        out += list(rng.choice(idx, size=min(k, len(idx)), replace=False))
    return out


#: The CoOp config the demo runs on MiniBench, whose schedule the proxy follows by default (path
#: relative to the repository, by the trainer table's rule).
DEFAULT_COOP_CONFIG = registry.trainer("coop").config_file("minibench_ep50_ctx16")


def proxy_settings(config_file: str) -> Dict[str, object]:
    """The CoOp proxy's keyword arguments (context, schedule, optimiser) read from a CoOp yaml config."""
    from yacs.config import CfgNode  # values decoded as Dassl's merge_from_file does: "5e-4" is a number

    try:
        with open(config_file) as f:
            cfg = CfgNode.load_cfg(f)
    except OSError as e:
        raise ValueError(f"calibrate --config {config_file}: cannot read it ({e.strerror})") from None
    want = {"n_ctx": ("TRAINER", "COOP", "N_CTX"), "ctx_init": ("TRAINER", "COOP", "CTX_INIT"),
            "epochs": ("OPTIM", "MAX_EPOCH"), "lr": ("OPTIM", "LR"), "momentum": ("OPTIM", "MOMENTUM"),
            "weight_decay": ("OPTIM", "WEIGHT_DECAY"), "batch_size": ("DATALOADER", "TRAIN_X", "BATCH_SIZE")}
    out: Dict[str, object] = {}
    for name, keys in want.items():
        node = cfg
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                raise ValueError(f"calibrate --config {config_file}: key {'.'.join(keys)} is missing "
                                 "(expected a CoOp trainer config, e.g. " + DEFAULT_COOP_CONFIG + ")")
            node = node[k]
        out[name] = CfgNode._decode_cfg_value(node)  # what merge_from_file does with each value
    return out


def coop_proxy(weights: str, dataset_dir: str, *, shots: int = 16, seed: int = 1, epochs: int = 10,
               lr: float = 0.01, n_ctx: int = 4, ctx_init: str = "a photo of a", batch_size: int = 32,
               momentum: float = 0.9, weight_decay: float = 5e-4) -> Dict[str, float]:
    """Zero-shot, linear probe and CoOp-proxy accuracies (%) on MiniBench's test split."""
    from ..backbone import FrozenCLIP
    from ..models import CoOp

    torch.manual_seed(seed)
    clip_model = pretrain.load_clip(weights)
    split = data.read_split(dataset_dir, "minibench")
    train, test = split["train"], split["test"]
    base, new = list(data.BASE_CLASSES), list(data.NEW_CLASSES)
    tr_idx = _kshot(train, base, shots, seed)
    xtr = _features(clip_model, [train[i][0] for i in tr_idx])
    ytr = torch.tensor([train[i][1] for i in tr_idx])
    xte = _features(clip_model, [it[0] for it in test])
    yte = torch.tensor([it[1] for it in test])
    scale = clip_model.logit_scale.exp().item()

    def acc(logits, y, classes):
        cls = torch.tensor(classes)
        m = torch.isin(y, cls)
        pred = cls[logits[m][:, cls].argmax(1)]
        return round(100.0 * (pred == y[m]).float().mean().item(), 2)

    out: Dict[str, float] = {}
    zs = F.normalize(pretrain.encode_classnames(clip_model, data.CLASSNAMES), dim=-1)
    out["zs_base"], out["zs_new"] = acc(xte @ zs.t(), yte, base), acc(xte @ zs.t(), yte, new)
    zs_tr = acc(xtr @ zs.t(), ytr, base)
    out["zs_base_train"] = zs_tr

    # linear probe (multinomial logistic regression, full batch, L2)
    w = torch.zeros(xtr.shape[1], len(base), requires_grad=True)
    b = torch.zeros(len(base), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)
    ytr_b = torch.tensor([base.index(int(y)) for y in ytr])

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(scale * xtr @ w + b, ytr_b) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        mb = torch.isin(yte, torch.tensor(base))
        pred = (scale * xte[mb] @ w + b).argmax(1)
        out["probe_base"] = round(100.0 * (torch.tensor(base)[pred] == yte[mb]).float().mean().item(), 2)

    # CoOp proxy: shared context over all 24 class prompts, trained on the base columns only
    frozen = FrozenCLIP(clip_model)
    coop = CoOp(frozen, list(data.CLASSNAMES), n_ctx=n_ctx, ctx_init=ctx_init)
    params = [p for p in coop.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = len(tr_idx)
    steps_per_epoch = math.ceil(n / batch_size)
    g = torch.Generator().manual_seed(seed)
    cls_base = torch.tensor(base)
    for ep in range(epochs):
        for group in opt.param_groups:  # cosine per epoch (warm-up epoch at constant 1e-5 as the configs)
            group["lr"] = 1e-5 if ep == 0 else 0.5 * lr * (1 + math.cos(math.pi * ep / epochs))
        perm = torch.randperm(n, generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            t = F.normalize(coop._encode_text(), dim=-1)
            logits = scale * xtr[idx] @ t[cls_base].t()
            loss = F.cross_entropy(logits, ytr_b[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        t = F.normalize(coop._encode_text(), dim=-1)
        logits = xte @ t.t()
        out["coop_base"], out["coop_new"] = acc(logits, yte, base), acc(logits, yte, new)
    out["chance"] = round(100.0 / len(base), 2)
    out["num_test"] = int(len(test))
    return out
