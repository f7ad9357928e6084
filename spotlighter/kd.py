"""PromptKD (Li et al., CVPR 2024): a ViT-B/16 student with IVLP visual prompts and a 512->768
projector, distilled from a frozen IVLP/PromptSRC teacher (typically ViT-L/14) on unlabelled images.

The student has no text tower of its own: it is scored against the teacher's prompted text
features, computed once for the run's classes. Training minimises ``KD_WEIGHT`` * KL(teacher ||
student) of the temperature-softened class distributions, with the original's reduction (summed over
the batch and the classes, divided by B*C, times T^2).
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import foreign
from .backbone import FrozenCLIP
from .config import ConfigError
from .models import IVLP, Output, _CLIPHolder, check_prompt_depths
from .prompt import VisualPrompts

#: The teacher's checkpoint folder inside an output directory (PromptSRC's and IVLP's module name).
TEACHER_MODULE = "VLPromptLearner"
#: Where a teacher comes from, said with every error about a missing one.
TEACHER_HELP = ("PromptKD publishes PromptSRC-trained ViT-L/14 teachers (its README links them; each is "
                "<dataset>/VLPromptLearner/model-best.pth.tar); or train one here with `CFG="
                "vit_l14_c2_ep20_batch8_4+4ctx bash scripts/base2new.sh promptsrc DATASET 16` and point "
                "TRAINER.PROMPTKD.TEACHER at its output folder")


class FeatureProjector(nn.Module):
    """PromptKD's two-layer projector: 1x1 conv -> BatchNorm -> ReLU -> 1x1 conv on (B, in) rows
    (``Feature_Trans_Module_two_layer``; ``conv1`` keeps the original's parameter names)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_dim, out_dim, 1), nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True),
                                   nn.Conv2d(out_dim, out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x.unsqueeze(-1).unsqueeze(-1)).squeeze(-1).squeeze(-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, summed and divided by B*C, times T^2."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="sum") * (t * t) / student_logits.numel()


def teacher_file(path: str) -> str:
    """The checkpoint file of a teacher given as a file, an output folder, or its VLPromptLearner folder,
    found as evaluations find theirs (:func:`spotlighter.checkpoint.find_checkpoint`: best-val file, else
    the ``checkpoint`` pointer's file, else the last ``model.pth.tar-N``)."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return path
    if not path or not os.path.isdir(path):
        raise ConfigError(f"TRAINER.PROMPTKD.TEACHER = {path!r} is not a checkpoint file or folder. {TEACHER_HELP}.")
    folder = os.path.join(path, TEACHER_MODULE) if os.path.isdir(os.path.join(path, TEACHER_MODULE)) else path
    try:
        return ckpt.find_checkpoint(folder)[0]
    except ckpt.CheckpointError as exc:
        raise ConfigError(f"TRAINER.PROMPTKD.TEACHER = {path!r}: no teacher checkpoint in {folder} ({exc}). "
                          f"{TEACHER_HELP}.") from None


def read_teacher_state(path: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """(IVLP prompt tensors under our names, a description) of a teacher checkpoint: one of ours
    (trainer IVLP or PromptSRC) or one the PromptSRC/PromptKD repositories wrote."""
    raw = foreign.read(path)
    if foreign.is_original(raw):
        state = {k[7:] if k.startswith("module.") else k: v for k, v in raw["state_dict"].items()}
        return foreign.from_ivlp(state, path), "written by the original PromptSRC code"
    if raw.get("format") != ckpt.FORMAT or raw.get("trainer") not in ("IVLP", "PromptSRC"):
        raise ckpt.CheckpointError(f"{path} is not a PromptSRC or IVLP checkpoint (trainer "
                                   f"{raw.get('trainer')!r}); a PromptKD teacher is one. {TEACHER_HELP}.")
    return {k: v.float() for k, v in raw["state_dict"].items()}, f"a {raw['trainer']} checkpoint of this project"


def load_teacher(teacher: IVLP, path: str) -> str:
    """Load a teacher checkpoint into ``teacher`` (shapes checked: a teacher of another depth, token count
    or width is an error naming the keys); freeze it. Returns what was loaded, for the log."""
    state, what = read_teacher_state(path)
    want = {k: list(v.shape) for k, v in teacher.state_dict().items()}
    have = {k: list(v.shape) for k, v in state.items()}
    if have != want:
        diff = ", ".join(f"{k}: checkpoint {have.get(k)} vs config {want.get(k)}"
                         for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))
        raise ckpt.CheckpointError(
            f"{path} does not fit the teacher this config builds ({diff}). Set TRAINER.PROMPTKD.TEACHER_N_CTX_TEXT "
            "/ TEACHER_N_CTX_VISION / TEACHER_PROMPT_DEPTH_TEXT / TEACHER_PROMPT_DEPTH_VISION and "
            "TEACHER_NAME as in the run that trained it.")
    teacher.load_state_dict(state, strict=True)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    return f"{path} ({what})"


class PromptKD(_CLIPHolder):
    """The PromptKD student. ``teacher``: a loaded, frozen IVLP/PromptSRC model built for ``classnames``."""

    NODE = "PROMPTKD"

    def __init__(self, clip: FrozenCLIP, teacher: IVLP, n_vision: int = 4, vision_depth: int = 9,
                 round_prompts: bool = True, kd_weight: float = 1.0, temperature: float = 1.0):
        super().__init__(clip)
        check_prompt_depths(clip, self.NODE, 1, vision_depth)
        if not temperature > 0:
            raise ConfigError(f"TRAINER.PROMPTKD.TEMPERATURE = {temperature!r} is invalid: expected a number > 0.")
        if teacher.clip.input_resolution != clip.input_resolution:
            raise ConfigError(f"the teacher CLIP ({teacher.clip.input_resolution} px) and the student CLIP "
                              f"({clip.input_resolution} px) see the same images: set TRAINER.PROMPTKD.TEACHER_NAME "
                              "to a CLIP of the student's resolution (e.g. ViT-L/14, not ViT-L/14@336px, for ViT-B/16).")
        self._teacher = [teacher]  # not a submodule: never trained, never saved with the student
        self.prompt_learner = VisualPrompts(clip, n_vision, vision_depth)
        with torch.no_grad():
            text = teacher.text_features()
        self.register_buffer("teacher_text", text, persistent=False)
        self.VPT_image_trans = FeatureProjector(clip.embed_dim, text.shape[1])
        self.round_prompts = round_prompts
        self.kd_weight = float(kd_weight)
        self.temperature = float(temperature)

    @property
    def teacher(self) -> IVLP:
        return self._teacher[0]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        visual, deep = self.prompt_learner.visual()
        v = self.clip.encode_image(images, visual, deep, pruned=self._pruned(), round_prompts=self.round_prompts)
        return F.normalize(self.VPT_image_trans(v.float()), dim=-1)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Output:
        logits = self.clip.logit_scale.exp().float() * self.image_features(images) @ self.teacher_text.t()
        if not self.training:
            return logits, {}
        with torch.no_grad():
            teacher_logits = self.teacher.image_logits(images, self.teacher_text)
        return logits, {"kd": self.kd_weight * kd_loss(logits, teacher_logits, self.temperature)}

