"""Tiny models on the tiny CLIP, shared by the model, pruning, merging and picture tests."""

import torch
from yacs.config import CfgNode as CN

from spotlighter.backbone import FrozenCLIP
from spotlighter.config import apply_preset, extend_cfg
from spotlighter.method import HeadConfig
from spotlighter.models import CoCoOp, CoOp, MaPLe, Spotlighter, ZeroShotCLIP

NAMES = ["cat", "dog_house", "red car", "x"]
B = 3


def images(batch=B, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def head_cfg(preset, heads=8):
    cfg = CN()
    cfg.DATASET, cfg.MODEL, cfg.TRAINER = CN(), CN(), CN()
    cfg.MODEL.BACKBONE = CN()
    extend_cfg(cfg)
    apply_preset(cfg, preset)
    cfg.TRAINER.SPOTLIGHTER.IRM.HEADS = heads
    return HeadConfig.from_cfg(cfg.TRAINER.SPOTLIGHTER)


def build(kind, clip):
    torch.manual_seed(0)
    if kind == "zsclip":
        return ZeroShotCLIP(clip, NAMES)
    if kind == "coop":
        return CoOp(clip, NAMES)
    if kind == "cocoop":
        return CoCoOp(clip, NAMES)
    if kind == "maple":
        return MaPLe(clip, NAMES, depth=2)
    if kind == "spot-paper":
        return Spotlighter(clip, NAMES, head_cfg("paper", 8))
    if kind == "spot-release":
        return Spotlighter(clip, NAMES, head_cfg("release", 1))
    raise KeyError(kind)


KINDS = ["zsclip", "coop", "cocoop", "maple", "spot-paper", "spot-release"]


def empty_cfg():
    """A cfg with only the project's keys and their defaults (what train.py's extend_cfg adds)."""
    cfg = CN()
    cfg.DATASET, cfg.MODEL, cfg.TRAINER = CN(), CN(), CN()
    cfg.MODEL.BACKBONE = CN()
    extend_cfg(cfg)
    return cfg


def build_all(clip):
    """One model of each kind that prunes (no MaPLe) on ``clip``, seeded."""
    torch.manual_seed(0)
    return {"zsclip": ZeroShotCLIP(clip, NAMES), "coop": CoOp(clip, NAMES), "cocoop": CoCoOp(clip, NAMES),
            "spot-paper": Spotlighter(clip, NAMES, head_cfg("paper", 8)),
            "spot-release": Spotlighter(clip, NAMES, head_cfg("release", 1))}


def check_reduced_forward(model, spec, reference):
    """The reduced forward of ``spec`` against ``reference(model, x, spec)`` -> (global features, patch
    indices), and the token bookkeeping every reduction mode shares; returns the ImageTokens."""
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    clip = FrozenCLIP(model, spec)
    with torch.no_grad():
        ref, ref_index = reference(model, x, spec)
        out = clip.encode_image(x)
        tok = clip.encode_image_tokens(x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(tok.global_feat, ref, atol=1e-5)
    assert torch.equal(tok.patch_index, ref_index)
    n = spec.remaining(16)
    assert tok.tokens.shape == (3, 1 + n, model.visual.proj.shape[1])  # the fused token is not returned
    assert tok.cls_attn.shape == (3, n)
    assert len(tok.kept_index) == len(spec.layers) and torch.equal(tok.kept_index[-1], tok.patch_index)
    for earlier, later in zip(tok.kept_index, tok.kept_index[1:]):  # a removed patch never comes back
        assert all(set(l.tolist()) <= set(e.tolist()) for e, l in zip(earlier, later))
    return tok
