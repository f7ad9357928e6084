"""The one way to build a model: :func:`build_model` turns a config and class names into the plain
``nn.Module`` of any registered trainer (``forward(images, labels=None) -> (logits, losses)``).

The Dassl trainers (``trainers/``), the Python API (:mod:`spotlighter.api`), the benchmark, the GPU
check and the tests all build through it, from a config of :func:`spotlighter.config.default_cfg`,
so the benchmarked and the loaded model is the trained model by construction. Plain torch and yacs:
no Dassl.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from . import models
from .backbone import FrozenCLIP, PruneSpec, load_clip
from .config import ConfigError, check_precision, check_prune_cfg, check_spotlighter_cfg
from .method import HeadConfig
from .openclip import check_same_images
from .prompt import PromptTooLong
from .registry import RegistryError
from .registry import trainer as registered
from .templates import template_for

logger = logging.getLogger(__name__)

#: CLIP weights per precision (amp: fp32 weights, autocast around the forward).
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "amp": torch.float32}


def node_of(cfg):
    """``cfg.TRAINER.<node>`` of the trainer named by ``cfg.TRAINER.NAME``."""
    return cfg.TRAINER[spec_of(cfg).node]


def spec_of(cfg):
    """The registry entry of ``cfg.TRAINER.NAME`` (a :class:`ConfigError` listing the known ones)."""
    try:
        return registered(cfg.TRAINER.NAME or "")
    except RegistryError as exc:
        raise ConfigError(f"TRAINER.NAME = {cfg.TRAINER.NAME!r}: {exc}") from None


def cfg_path(cfg, text: str) -> str:
    """A path key's value with ``{root}`` replaced by DATASET.ROOT and ``{dataset}`` by DATASET.NAME."""
    return text.replace("{root}", cfg.DATASET.ROOT).replace("{dataset}", cfg.DATASET.NAME)


def resolve_precision(cfg, device: torch.device) -> str:
    """The trainer node's PREC; fp16 on a CPU falls back to fp32 (with a warning)."""
    key = f"TRAINER.{spec_of(cfg).node}.PREC"
    prec = node_of(cfg).PREC
    check_precision(key, prec)
    if prec == "fp16" and torch.device(device).type == "cpu":
        logger.warning("%s = fp16 is not supported on CPU (about 20x slower, and half-precision CPU kernels are "
                       "incomplete): falling back to fp32.", key)
        return "fp32"
    return prec


def load_frozen_clip(cfg, device="cpu", precision: Optional[str] = None) -> FrozenCLIP:
    """The frozen CLIP of MODEL.BACKBONE (NAME, or PATH: a weight file, ``{root}/...`` under
    DATASET.ROOT) with MODEL.PRUNE, in ``precision`` (default: :func:`resolve_precision`)."""
    check_prune_cfg(cfg.MODEL.PRUNE)
    precision = precision or resolve_precision(cfg, device)
    backbone = cfg.MODEL.BACKBONE
    clip_model = load_clip(backbone.NAME, cfg_path(cfg, backbone.PATH), device, DTYPES[precision])
    return FrozenCLIP(clip_model, PruneSpec.from_cfg(cfg.MODEL.PRUNE))


# ------------------------------------------------------------------------------------------------
# one builder per registered trainer: (cfg, its node, clip, classnames, teacher) -> model
# ------------------------------------------------------------------------------------------------
def _zsclip(cfg, n, clip, classnames, teacher):
    return models.ZeroShotCLIP(clip, classnames, template_for(cfg.DATASET.NAME, n.TEMPLATE))


def _coop(cfg, n, clip, classnames, teacher):
    return models.CoOp(clip, classnames, n_ctx=n.N_CTX, ctx_init=n.CTX_INIT, csc=n.CSC,
                       class_token_position=n.CLASS_TOKEN_POSITION)


def _cocoop(cfg, n, clip, classnames, teacher):
    return models.CoCoOp(clip, classnames, n_ctx=n.N_CTX, ctx_init=n.CTX_INIT, reduction=n.META_NET_REDUCTION)


def _maple(cfg, n, clip, classnames, teacher):
    return models.MaPLe(clip, classnames, n_ctx=n.N_CTX, ctx_init=n.CTX_INIT, depth=n.PROMPT_DEPTH)


def ivlp_kwargs(n, prefix: str = "") -> dict:
    """IVLP's prompt design from an IVLP/PromptSRC/PromptKD node (``prefix`` TEACHER_: a teacher's)."""
    return dict(n_text=n[prefix + "N_CTX_TEXT"], n_vision=n[prefix + "N_CTX_VISION"], ctx_init=n[prefix + "CTX_INIT"],
                text_depth=n[prefix + "PROMPT_DEPTH_TEXT"], vision_depth=n[prefix + "PROMPT_DEPTH_VISION"],
                round_prompts=n.ROUND_PROMPTS_FP16)


def _ivlp(cfg, n, clip, classnames, teacher):
    return models.IVLP(clip, classnames, **ivlp_kwargs(n))


def _promptsrc(cfg, n, clip, classnames, teacher):
    return models.PromptSRC(clip, classnames, text_weight=n.TEXT_LOSS_WEIGHT, image_weight=n.IMAGE_LOSS_WEIGHT,
                            **ivlp_kwargs(n))


def _spotlighter(cfg, n, clip, classnames, teacher):
    check_spotlighter_cfg(n, num_patches=clip.num_patches, width=clip.embed_dim)
    return models.Spotlighter(clip, classnames, HeadConfig.from_cfg(n), n_ctx=n.N_CTX, ctx_init=n.CTX_INIT,
                              csc=n.CSC, class_token_position=n.CLASS_TOKEN_POSITION)


def build_teacher(cfg, classnames: Sequence[str], clip: FrozenCLIP) -> nn.Module:
    """PromptKD's frozen teacher: an IVLP on TEACHER_NAME / TEACHER_PATH (the student CLIP's device and
    precision) with the TEACHER checkpoint loaded."""
    from . import kd

    n = cfg.TRAINER.PROMPTKD
    device = clip.model.positional_embedding.device
    teacher_clip = FrozenCLIP(load_clip(n.TEACHER_NAME, cfg_path(cfg, n.TEACHER_PATH), device, clip.dtype),
                              explicit_attention=clip.explicit_attention)
    problem = check_same_images(clip, teacher_clip, cfg.MODEL.BACKBONE.NAME, n.TEACHER_NAME)
    if problem:
        raise ConfigError(problem)
    teacher = models.IVLP(teacher_clip, classnames, **ivlp_kwargs(n, "TEACHER_")).to(device)
    logger.info("Teacher: %s", kd.load_teacher(teacher, kd.teacher_file(cfg_path(cfg, n.TEACHER))))
    return teacher


def _promptkd(cfg, n, clip, classnames, teacher):
    from . import kd

    teacher = teacher if teacher is not None else build_teacher(cfg, classnames, clip)
    return kd.PromptKD(clip, teacher, n_vision=n.N_CTX_VISION, vision_depth=n.PROMPT_DEPTH_VISION,
                       round_prompts=n.ROUND_PROMPTS_FP16, kd_weight=n.KD_WEIGHT, temperature=n.TEMPERATURE)


def _spotlighterkd(cfg, n, clip, classnames, teacher):
    from . import kd_spotlighter

    head = cfg.TRAINER.SPOTLIGHTERKD
    explicit = bool(head.EXPLICIT_ATTENTION)
    if clip.explicit_attention != explicit:  # a view of the same frozen CLIP: the caller's stays as it is
        clip = FrozenCLIP(clip.model, clip.prune, explicit_attention=explicit)
    teacher = teacher if teacher is not None else build_teacher(cfg, classnames, clip)
    return kd_spotlighter.SpotlighterKD(clip, teacher, classnames, kd_spotlighter.KDHeadConfig.from_cfg(head),
                                        n_vision=n.N_CTX_VISION, vision_depth=n.PROMPT_DEPTH_VISION,
                                        round_prompts=n.ROUND_PROMPTS_FP16, kd_weight=n.KD_WEIGHT,
                                        temperature=n.TEMPERATURE)


Builder = Callable[..., nn.Module]
#: Registered trainer name (spotlighter.registry.TRAINERS) -> its model builder.
BUILDERS: Dict[str, Builder] = {
    "ZeroshotCLIP": _zsclip, "CoOp": _coop, "CoCoOp": _cocoop, "MaPLe": _maple, "IVLP": _ivlp,
    "PromptSRC": _promptsrc, "Spotlighter": _spotlighter, "PromptKD": _promptkd, "SpotlighterKD": _spotlighterkd,
}


def build_model(cfg, classnames: Sequence[str], clip: FrozenCLIP, teacher: Optional[nn.Module] = None) -> nn.Module:
    """The model of ``cfg.TRAINER.NAME`` for ``classnames`` on the frozen ``clip``
    (:func:`load_frozen_clip`), on the CLIP's device. ``teacher`` (PromptKD, SpotlighterKD): a frozen IVLP for
    the same classes; by default the one TRAINER.PROMPTKD.TEACHER* describe (:func:`build_teacher`)."""
    spec = spec_of(cfg)
    classnames = list(classnames)
    if not classnames or not all(isinstance(c, str) and c.strip() for c in classnames):
        raise ConfigError(f"classnames must be a non-empty list of non-empty strings; got {classnames[:5]!r}"
                          + (" ..." if len(classnames) > 5 else ""))
    try:
        model = BUILDERS[spec.name](cfg, cfg.TRAINER[spec.node], clip, classnames, teacher)
    except PromptTooLong as exc:  # name this trainer's CTX_INIT key
        raise exc.for_node(f"TRAINER.{spec.node}") from None
    return model.to(clip.model.positional_embedding.device)
