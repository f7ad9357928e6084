"""Checkpoints written by the original repositories (CoOp/CoCoOp: ``KaiyangZhou/CoOp``; MaPLe:
``muzairkhattak/multimodal-prompt-learning``; IVLP/PromptSRC: ``muzairkhattak/PromptSRC``, whose
PromptSRC checkpoints PromptKD publishes as teachers), read safely and converted to this project's keys.

Those repos save with Dassl's ``save_checkpoint``: ``{"state_dict", "epoch", "optimizer",
"scheduler", "val_result"}``. With a warm-up epoch (every shipped CoOp/CoCoOp/MaPLe config), the
scheduler's state dict holds the successor scheduler *object* (e.g. ``CosineAnnealingLR``), which
holds the optimizer object (``SGD``, its momentum buffers in a ``defaultdict``). They are read with
``torch.load(weights_only=True)`` and an allow-list of exactly those classes (:data:`ALLOWED`): a file
naming any other global is refused, and nothing in it is executed.

One converter per source maps the original ``state_dict`` to ours (:data:`CONVERTERS`): tensors
become float32 (the originals keep fp16 prompts under ``PREC fp16``), class-dependent buffers
(``token_prefix``/``token_suffix``) and MaPLe's, IVLP's and PromptSRC's copies of the frozen CLIP are
dropped, anything else unknown is an error naming the key.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Tuple

import torch
from torch.optim import lr_scheduler

from .checkpoint import FORMAT, UNREADABLE_FIX, CheckpointError
from .fileio import describe_unreadable

StateDict = Dict[str, torch.Tensor]


def _plain_dict(default_factory=None):
    """Stands in for ``collections.defaultdict`` (the optimizer's ``state``): torch's safe unpickler
    fills only plain dicts, and nothing here uses that state."""
    return {}


#: Globals a Dassl checkpoint of CoOp/CoCoOp/MaPLe may name, beyond what ``weights_only`` allows:
#: the successor schedulers and optimizers Dassl's ``build_lr_scheduler`` / ``build_optimizer``
#: create from torch, the optimizer's ``defaultdict`` state (read as a dict) and its factory.
ALLOWED = [
    lr_scheduler.CosineAnnealingLR, lr_scheduler.StepLR, lr_scheduler.MultiStepLR,
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
    (_plain_dict, "collections.defaultdict"), dict,
]


def read(path: str) -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with :data:`ALLOWED`; a refusal names the file and the
    global that is not allowed."""
    try:
        with torch.serialization.safe_globals(ALLOWED):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"unrecognized function ([^\s]+)", text)
        if found:
            why = (f"it names {found.group(1)}, which is not among the classes a CoOp/CoCoOp/MaPLe (Dassl) "
                   f"or {FORMAT} checkpoint contains; pickled objects are never executed")
            raise CheckpointError(f"{path} was not loaded: {why}.") from None
        raise CheckpointError(f"{path} is {describe_unreadable(path, exc)}. {UNREADABLE_FIX}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a checkpoint dict.")
    return data


def _float(v: torch.Tensor) -> torch.Tensor:
    return v.detach().float() if v.is_floating_point() else v.detach()


def _convert(state: StateDict, path: str, source: str, rename: Callable[[str], str | None],
             drop: Tuple[str, ...]) -> StateDict:
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith(drop) or key in drop:
            continue
        new = rename(key)
        if new is None:
            raise CheckpointError(f"{path}: key {key!r} is not part of a {source} prompt learner; is this a "
                                  f"{source} checkpoint of the original repository?")
        out[new] = _float(value)
    if "prompt_learner.ctx" not in out:
        raise CheckpointError(f"{path} has no context vectors ('ctx'): not a {source} checkpoint.")
    return out


def from_coop(state: StateDict, path: str = "checkpoint") -> StateDict:
    """CoOp (``prompt_learner`` module): ``ctx`` (``(n_ctx, w)``, or ``(n_cls, n_ctx, w)`` with CSC)."""
    return _convert(state, path, "CoOp", lambda k: "prompt_learner.ctx" if k == "ctx" else None,
                    ("token_prefix", "token_suffix"))


_COCOOP_META = {"linear1": "0", "linear2": "2"}  # their named Sequential, our indexed one


def from_cocoop(state: StateDict, path: str = "checkpoint") -> StateDict:
    """CoCoOp (``prompt_learner`` module): ``ctx`` and ``meta_net.linear{1,2}.{weight,bias}``."""
    def rename(key: str):
        if key == "ctx":
            return "prompt_learner.ctx"
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "meta_net" and parts[1] in _COCOOP_META and \
                parts[2] in ("weight", "bias"):
            return f"prompt_learner.meta_net.{_COCOOP_META[parts[1]]}.{parts[2]}"
        return None

    return _convert(state, path, "CoCoOp", rename, ("token_prefix", "token_suffix"))


_MAPLE_KEY = re.compile(r"prompt_learner\.(ctx|proj\.(weight|bias)|compound_prompts_text\.\d+|"
                        r"compound_prompt_projections\.\d+\.(weight|bias))$")


def from_maple(state: StateDict, path: str = "checkpoint") -> StateDict:
    """MaPLe (``MultiModalPromptLearner`` = the whole CustomCLIP): the ``prompt_learner.*`` tensors
    (``ctx``, ``proj``, ``compound_prompts_text.i``, ``compound_prompt_projections.i``); its copy of
    the frozen CLIP (``image_encoder``, ``text_encoder``, ``logit_scale``) is dropped."""
    return _convert(state, path, "MaPLe", lambda k: k if _MAPLE_KEY.match(k) else None,
                    ("prompt_learner.token_prefix", "prompt_learner.token_suffix", "image_encoder.",
                     "text_encoder.", "logit_scale"))


_IVLP_TEXT = re.compile(r"text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
_IVLP_VISION = re.compile(r"image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")


def from_ivlp(state: StateDict, path: str = "checkpoint") -> StateDict:
    """IVLP / PromptSRC (``VLPromptLearner`` = the whole CustomCLIP): the text context
    ``prompt_learner.ctx``, the deep text prompts ``text_encoder.transformer.resblocks.<i>.VPT_shallow``
    (i = 1 .. depth-1), the visual prompts ``image_encoder.VPT`` and
    ``image_encoder.transformer.resblocks.<i>.VPT_shallow``. The rest of its frozen CLIP copy,
    PromptSRC's frozen image encoder (``prompt_learner.ZS_image_encoder``) and the class buffers are
    dropped. Deep prompts must be numbered 1, 2, ... without gaps."""
    def rename(key: str):
        if key == "prompt_learner.ctx":
            return key
        if key == "image_encoder.VPT":
            return "prompt_learner.visual_prompt"
        for pattern, target in ((_IVLP_TEXT, "text_prompts"), (_IVLP_VISION, "visual_prompts")):
            m = pattern.match(key)
            if m:
                return f"prompt_learner.{target}.{int(m.group(1)) - 1}"
        return None

    def frozen(key: str) -> bool:  # the frozen CLIP copy and the class buffers
        return (key.startswith(("image_encoder.", "text_encoder.", "prompt_learner.ZS_image_encoder."))
                or key in ("logit_scale", "prompt_learner.token_prefix", "prompt_learner.token_suffix")) \
            and rename(key) is None

    out = _convert({k: v for k, v in state.items() if not frozen(k)}, path, "IVLP/PromptSRC", rename, ())
    for group in ("text_prompts", "visual_prompts"):
        found = sorted(int(k.rsplit(".", 1)[1]) for k in out if k.startswith(f"prompt_learner.{group}."))
        if found != list(range(len(found))):
            raise CheckpointError(f"{path}: its {group.replace('_', ' ')} are at blocks "
                                  f"{[i + 1 for i in found]}; IVLP/PromptSRC prompt blocks 1, 2, ... without gaps.")
    return out


_KD_PROJECTOR = re.compile(r"VPT_image_trans\.conv1\.[013]\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def from_promptkd(state: StateDict, path: str = "checkpoint") -> StateDict:
    """A PromptKD student (``VLPromptLearner`` = its whole CustomCLIP): the visual prompts
    (``image_encoder.VPT``, ``image_encoder.transformer.resblocks.<i>.VPT_shallow``) and the projector
    ``VPT_image_trans.*`` (BatchNorm statistics included); its frozen ViT-B/16 copy is dropped."""
    out: StateDict = {}
    for key, value in state.items():
        m = _IVLP_VISION.match(key)
        if key == "image_encoder.VPT":
            out["prompt_learner.visual_prompt"] = _float(value)
        elif m:
            out[f"prompt_learner.visual_prompts.{int(m.group(1)) - 1}"] = _float(value)
        elif _KD_PROJECTOR.match(key):
            out[key] = _float(value)
        elif not (key.startswith("image_encoder.") or key == "logit_scale"):
            raise CheckpointError(f"{path}: key {key!r} is not part of a PromptKD student; is this a PromptKD "
                                  "checkpoint of the original repository?")
    if not any(k.startswith("VPT_image_trans.") for k in out):
        raise CheckpointError(f"{path} has no projector ('VPT_image_trans'): not a PromptKD student checkpoint.")
    return out


#: Trainer name -> converter of that trainer's original-repository checkpoints.
CONVERTERS: Dict[str, Callable[[StateDict, str], StateDict]] = {
    "CoOp": from_coop, "CoCoOp": from_cocoop, "MaPLe": from_maple, "IVLP": from_ivlp, "PromptSRC": from_ivlp,
    "PromptKD": from_promptkd,
}


def is_original(data: Dict[str, Any]) -> bool:
    """A Dassl ``save_checkpoint`` dict (not one of this project's checkpoints)."""
    return data.get("format") != FORMAT and isinstance(data.get("state_dict"), dict) and "epoch" in data


def convert(data: Dict[str, Any], trainer: str, path: str) -> Tuple[StateDict, int]:
    """(our state dict, epoch) of an original-repository checkpoint of ``trainer``."""
    if trainer not in CONVERTERS:
        raise CheckpointError(f"{path} is a Dassl checkpoint of another codebase; only "
                              f"{', '.join(CONVERTERS)} checkpoints of the original repositories can be "
                              f"converted, not {trainer}'s.")
    state = {k[7:] if k.startswith("module.") else k: v for k, v in data["state_dict"].items()}
    return CONVERTERS[trainer](state, path), int(data["epoch"])
