"""Test models built the one way models are built (:func:`spotlighter.factory.build_model`), from a
trainer's shipped default config (configs/trainers/<name>/<default>.yaml) with test changes on top."""

import torch

from spotlighter.backbone import FrozenCLIP
from spotlighter.config import apply_preset, default_cfg, trainer_cfg
from spotlighter.factory import build_model
from spotlighter.method import HeadConfig
from spotlighter.registry import trainer as registered

NAMES = ["cat", "dog_house", "red car", "x"]
B = 3


def shipped_cfg(trainer: str, changes=None):
    """The config of ``trainer``'s shipped default yaml file, with ``changes`` (dotted key -> value)."""
    return trainer_cfg(trainer, changes, config=registered(trainer).default_config)


def make_model(trainer: str, clip, classnames, changes=None, teacher=None):
    """``trainer``'s model on the frozen ``clip`` (see :func:`shipped_cfg`)."""
    return build_model(shipped_cfg(trainer, changes), classnames, clip, teacher=teacher)


#: kind -> (trainer, changes of its shipped config for the tiny CLIP)
MODELS = {
    "zsclip": ("zsclip", None), "coop": ("coop", None), "cocoop": ("cocoop", None),
    "maple": ("maple", {"TRAINER.MAPLE.PROMPT_DEPTH": 2}),
    "spot-paper": ("spotlighter", {"TRAINER.SPOTLIGHTER.IRM.HEADS": 8}),
    "spot-release": ("spotlighter", {"TRAINER.SPOTLIGHTER.PRESET": "release", "TRAINER.SPOTLIGHTER.IRM.HEADS": 1}),
}
KINDS = list(MODELS)


def build(kind, clip, names=NAMES):
    """Model ``kind`` (:data:`MODELS`) for ``names`` on the frozen ``clip``."""
    trainer, changes = MODELS[kind]
    return make_model(trainer, clip, names, changes)


def images(batch=B, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def head_cfg(preset, heads=8):
    """Spotlighter's head config of ``preset`` with ``heads`` IRM heads."""
    cfg = default_cfg()
    apply_preset(cfg, preset)
    cfg.TRAINER.SPOTLIGHTER.IRM.HEADS = heads
    return HeadConfig.from_cfg(cfg.TRAINER.SPOTLIGHTER)


def reduction_models(clip):
    """The models that support token reduction, on ``clip`` (seeded)."""
    torch.manual_seed(0)
    return {kind: build(kind, clip) for kind in ("zsclip", "coop", "cocoop", "spot-paper", "spot-release")}


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
