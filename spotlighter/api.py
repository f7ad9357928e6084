"""A trained prompt outside Dassl: :func:`create_model` and :func:`load_trained` return a
:class:`Classifier`, a plain ``nn.Module`` from images to logits, built by
:func:`spotlighter.factory.build_model` (the trainers' own way). Plain torch and yacs: no Dassl.

:func:`load_trained` reads an output folder ``train.py`` wrote (its ``config.yaml`` and the checkpoint
``<module>/model-best.pth.tar`` / the one ``<module>/checkpoint`` names / ``model.pth.tar-N``), one
checkpoint file, or a checkpoint of the original CoOp / CoCoOp / MaPLe / PromptSRC / PromptKD code
(as ``train.py --eval-only`` reads them; its prompt design is read from the tensors' shapes).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import factory, foreign
from .config import CfgChanges, ConfigError, default_cfg, merge_cfg, trainer_cfg
from .registry import TRAINERS
from .registry import trainer as registered

#: OpenAI CLIP's image normalisation (what every shipped config sets as INPUT.PIXEL_MEAN / PIXEL_STD):
#: :func:`create_model`'s default.
CLIP_PIXEL_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_PIXEL_STD = [0.26862954, 0.26130258, 0.27577711]
#: The backbone of :func:`create_model` and of an original repository's checkpoint unless told otherwise.
DEFAULT_BACKBONE = "ViT-B/16"
#: A ``backbone`` with one of these endings is a weight file even where it does not exist (the error names it).
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: The run's config next to its checkpoints (written by every training; ``trainers/base.py``).
CONFIG_FILE = "config.yaml"


class Classifier(nn.Module):
    """``forward(images)``: normalised images (B, 3, R, R) -> logits (B, len(classnames)), float32.

    ``model`` is the trainer's model (``model(images, labels)`` gives the training losses too), ``clip``
    the frozen CLIP it runs on (a submodule here, so ``.to(device)`` moves both), ``cfg`` the config it
    was built from. :meth:`preprocess` turns a PIL image or an image file into the input the model was
    trained on."""

    def __init__(self, model: nn.Module, clip: nn.Module, classnames: Sequence[str], cfg, precision: str):
        super().__init__()
        self.model = model
        self.clip = clip
        self.classnames = list(classnames)
        self.cfg = cfg
        self.precision = precision
        self.eval()

    @property
    def resolution(self) -> int:
        return self.clip.input_resolution

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = self.clip.model.positional_embedding.device
        images = images.to(device)
        if self.precision == "amp":
            dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
            with torch.autocast(device.type, dtype=dtype):
                return self.model(images)[0].float()
        return self.model(images)[0].float()

    def preprocess(self, image) -> torch.Tensor:
        """A PIL image or an image file -> (3, R, R): the shorter side resized to R (bicubic), the centre
        crop, normalised with the config's INPUT.PIXEL_MEAN / PIXEL_STD (as the trainers test)."""
        from .pictures import load_image

        return load_image(image, self.resolution, self.cfg.INPUT.PIXEL_MEAN, self.cfg.INPUT.PIXEL_STD)[0]


def _precision(cfg, device, precision: Optional[str]) -> str:
    """``precision``, else fp32 on a CPU and the trainer's PREC on a GPU."""
    if precision is not None:
        return precision
    return "fp32" if torch.device(device).type == "cpu" else factory.resolve_precision(cfg, device)


def _set_backbone(cfg, backbone: Optional[str]) -> None:
    """``backbone``: an OpenAI CLIP name (MODEL.BACKBONE.NAME) or a weight file (MODEL.BACKBONE.PATH)."""
    if not backbone:
        return
    if os.path.exists(os.path.expanduser(backbone)) or backbone.endswith(WEIGHT_SUFFIXES):
        cfg.MODEL.BACKBONE.PATH = backbone
    else:
        cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.PATH = backbone, ""


def _build(cfg, classnames, device, precision, teacher=None):
    precision = _precision(cfg, device, precision)
    clip = factory.load_frozen_clip(cfg, device, precision)
    model = factory.build_model(cfg, classnames, clip, teacher=teacher)
    return Classifier(model, clip, classnames, cfg, precision)


def create_model(trainer: str, classnames: Sequence[str], backbone: Optional[str] = None, cfg: CfgChanges = None,
                 device="cpu", precision: Optional[str] = None, teacher: Optional[nn.Module] = None) -> Classifier:
    """An untrained model of ``trainer`` (``coop``, ``spotlighter``, ... or its registered name) for
    ``classnames``. ``backbone``: an OpenAI CLIP name or a weight file (default: the config's, else
    ViT-B/16); ``cfg``: changes of the trainer's defaults (a yaml file such as
    configs/trainers/CoOp/vit_b16_ep20_ctx4.yaml, a dict of dotted keys, or a CfgNode);
    ``precision``: fp32 / fp16 / amp (default: fp32 on a CPU, the config's PREC on a GPU)."""
    full = trainer_cfg(trainer, cfg, defaults={"INPUT.PIXEL_MEAN": CLIP_PIXEL_MEAN, "INPUT.PIXEL_STD": CLIP_PIXEL_STD,
                                               "MODEL.BACKBONE.NAME": DEFAULT_BACKBONE})
    _set_backbone(full, backbone)
    return _build(full, classnames, device, precision, teacher)


# ------------------------------------------------------------------------------------------------
# load_trained
# ------------------------------------------------------------------------------------------------
def _locate(path: str, epoch: Optional[int]):
    """(checkpoint file, the run folder holding its config.yaml or None)."""
    if os.path.isfile(path):
        run = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        return path, (run if os.path.isfile(os.path.join(run, CONFIG_FILE)) else None)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or folder (expected a training output folder or a "
                                "checkpoint file).")
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        cfg = _read_yaml(os.path.join(path, CONFIG_FILE))
        spec = factory.spec_of(cfg)
        file, _ = ckpt.find_checkpoint(os.path.join(path, spec.module), epoch, "give epoch=N for model.pth.tar-N")
        return file, path
    modules = sorted({t.module for t in TRAINERS.values() if os.path.isdir(os.path.join(path, t.module))})
    if not modules:
        known = ", ".join(sorted({t.module for t in TRAINERS.values()}))
        raise ckpt.CheckpointError(f"{path} holds neither {CONFIG_FILE} nor a checkpoint folder ({known}): give "
                                   "a training output folder (the one holding log.txt) or a checkpoint file.")
    file, _ = ckpt.find_checkpoint(os.path.join(path, modules[0]), epoch, "give epoch=N for model.pth.tar-N")
    return file, None


def _read_yaml(path: str):
    from yacs.config import CfgNode as CN

    try:
        with open(path) as f:
            return CN.load_cfg(f)
    except Exception as exc:  # yaml or yacs errors of many kinds
        raise ConfigError(f"{path} is not a readable run config ({type(exc).__name__}: {exc}).") from None


def _run_cfg(run: Optional[str], data: Dict[str, Any], path: str):
    """The run's config: its config.yaml over the defaults, else the run settings the checkpoint records."""
    cfg = default_cfg()
    if run is not None:
        cfg.set_new_allowed(True)  # a config of another Dassl or project version: extra keys are harmless
        cfg.merge_from_other_cfg(_read_yaml(os.path.join(run, CONFIG_FILE)))
        cfg.set_new_allowed(False)
        return cfg
    settings = data.get("settings")
    if not isinstance(settings, dict):
        raise ConfigError(f"{path} records no run settings and its run folder has no {CONFIG_FILE}: give "
                          "trainer=... and cfg=... (the trainer config file it was trained with).")
    cfg.TRAINER.NAME = data.get("trainer") or ""
    known = {k: v for k, v in settings.items() if _has_key(cfg, k)}
    merge_cfg(cfg, known, f"{path} (run settings)")
    return cfg


def _has_key(cfg, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def _original_changes(trainer: str, state: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """The prompt design of an original repository's (converted) checkpoint, read from its shapes."""
    node = f"TRAINER.{registered(trainer).node}."
    count = lambda group: sum(1 for k in state if k.startswith(f"prompt_learner.{group}."))  # noqa: E731
    ctx = state.get("prompt_learner.ctx")
    if trainer in ("CoOp", "CoCoOp"):
        out = {node + "N_CTX": int(ctx.shape[-2])}
        if trainer == "CoOp":
            out[node + "CSC"] = ctx.dim() == 3
        return out
    if trainer == "MaPLe":
        return {node + "N_CTX": int(ctx.shape[0]), node + "PROMPT_DEPTH": count("compound_prompts_text") + 1}
    vision = state.get("prompt_learner.visual_prompt")
    out = {node + "PROMPT_DEPTH_VISION": (count("visual_prompts") + 1) if vision is not None else 0}
    if vision is not None:
        out[node + "N_CTX_VISION"] = int(vision.shape[0])
    if trainer != "PromptKD":
        out.update({node + "N_CTX_TEXT": int(ctx.shape[0]), node + "PROMPT_DEPTH_TEXT": count("text_prompts") + 1})
    return out


def _original_trainer(raw: Dict[str, Any], path: str) -> str:
    """The trainer of an original repository's checkpoint, from its folder's name and its keys."""
    keys = set(raw["state_dict"])
    module = os.path.basename(os.path.dirname(os.path.abspath(path)))
    if any("VPT_image_trans" in k for k in keys):
        return "PromptKD"
    if module == "MultiModalPromptLearner" or any("compound_prompts_text" in k for k in keys):
        return "MaPLe"
    if module == "VLPromptLearner" or any("VPT" in k for k in keys):
        return "IVLP"  # PromptSRC's checkpoints too: at test time PromptSRC is IVLP
    if any(k.startswith("meta_net.") for k in keys):
        return "CoCoOp"
    if "ctx" in keys:
        return "CoOp"
    raise ckpt.CheckpointError(f"{path} is a Dassl checkpoint of another codebase; only "
                               f"{', '.join(foreign.CONVERTERS)} checkpoints of the original repositories can be "
                               "read (or give trainer=...).")


def _check_classes(state: Dict[str, torch.Tensor], classnames: Sequence[str], path: str) -> None:
    ctx = state.get("prompt_learner.ctx")
    if ctx is not None and ctx.dim() == 3 and ctx.shape[0] != len(classnames):
        raise ckpt.CheckpointError(
            f"{path} was trained with class-specific context (CSC) for {ctx.shape[0]} classes, but "
            f"{len(classnames)} class names were given: give the {ctx.shape[0]} class names it was trained "
            "with, in their training order.")


def load_trained(path: str, classnames: Sequence[str], backbone: Optional[str] = None, cfg: CfgChanges = None,
                 trainer: Optional[str] = None, device="cpu", precision: Optional[str] = None,
                 epoch: Optional[int] = None) -> Classifier:
    """The trained model of ``path`` for ``classnames`` (the training classes or any others; a
    class-specific context needs its own classes). ``path``: an output folder of ``train.py``, a
    checkpoint file of this project, or one of the original repositories' (their trainer and prompt
    design are read from the file; ``trainer`` / ``cfg`` override them). ``backbone``: the CLIP weights
    (an OpenAI name or a file) where the run's are elsewhere on this machine; ``epoch``: load
    ``model.pth.tar-<epoch>`` instead of the final model."""
    path = os.path.expanduser(os.fspath(path))
    file, run = _locate(path, epoch)
    raw = foreign.read(file)
    if foreign.is_original(raw):
        name = registered(trainer).name if trainer else _original_trainer(raw, file)
        state, _ = foreign.convert(raw, "IVLP" if name == "PromptSRC" else name, file)
        full = trainer_cfg(name, cfg, defaults={"INPUT.PIXEL_MEAN": CLIP_PIXEL_MEAN, "INPUT.PIXEL_STD": CLIP_PIXEL_STD,
                                                "MODEL.BACKBONE.NAME": DEFAULT_BACKBONE,
                                                **_original_changes(name, state)})
        class_state = None
    else:
        if raw.get("format") != ckpt.FORMAT:
            raise ckpt.CheckpointError(f"{file} is not a checkpoint of this project nor of an original repository.")
        full = _run_cfg(run, raw, file)
        if trainer and registered(trainer).name != raw.get("trainer"):
            raise ckpt.CheckpointError(f"{file} was written by trainer {raw.get('trainer')!r}, not {trainer!r}.")
        merge_cfg(full, cfg)
        state, class_state = raw["state_dict"], raw.get("class_state")
    _set_backbone(full, backbone)
    _check_classes(state, classnames, file)
    classifier = _build(full, classnames, device, precision)
    model = classifier.model
    want = {k: list(v.shape) for k, v in model.state_dict().items()}
    have = {k: list(v.shape) for k, v in state.items()}
    if have != want:
        diff = ", ".join(f"{k}: checkpoint {have.get(k)} vs config {want.get(k)}"
                         for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))
        node = registered(full.TRAINER.NAME).node
        raise ckpt.CheckpointError(f"{file} does not fit the model its config builds ({diff}). Give the "
                                   f"TRAINER.{node} values it was trained with (cfg=...).")
    model.load_state_dict(state, strict=True)
    if class_state is not None and hasattr(model, "load_class_state"):
        try:
            model.load_class_state(class_state)
        except (ValueError, KeyError, TypeError) as exc:
            raise ckpt.CheckpointError(f"{file}: {exc}.") from None
    return classifier.eval()
