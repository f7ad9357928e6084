"""The models as plain ``nn.Module``s: trainable parts as submodules, the frozen CLIP held
outside the module tree (so ``state_dict()`` never contains it).

Every model's ``forward(images, labels=None)`` returns ``(logits, losses)``; ``losses`` is a dict of
weighted loss terms when training with labels, empty otherwise.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import FrozenCLIP
from .config import ConfigError
from .method import ClassMemory, HeadConfig, SpotlighterHead
from .prompt import (CoCoOpPromptLearner, IVLPPromptLearner, MaPLePromptLearner, PromptLearner, TextEncoder,
                     check_class_prompts)
from .templates import DEFAULT_TEMPLATE, ENSEMBLE_TEMPLATES

Output = Tuple[torch.Tensor, Dict[str, torch.Tensor]]


def zero_shot_text(clip: FrozenCLIP, classnames: Sequence[str], template: str = DEFAULT_TEMPLATE) -> torch.Tensor:
    """Unit-norm frozen-CLIP text features of ``template.format(name)`` (C, d), float32."""
    texts = [template.format(n.replace("_", " ")) for n in classnames]
    check_class_prompts(clip, classnames, texts, f"use a shorter prompt template than {template!r}")
    return F.normalize(clip.encode_text(texts).float(), dim=-1)


class _CLIPHolder(nn.Module):
    def __init__(self, clip: FrozenCLIP):
        super().__init__()
        self._clip = [clip]

    @property
    def clip(self) -> FrozenCLIP:
        return self._clip[0]

    def _pruned(self) -> bool:
        """Whether this forward drops tokens (MODEL.PRUNE: always at test, in training if IN_TRAINING)."""
        return not self.training or self.clip.prune.in_training

    def _ce(self, logits: torch.Tensor, labels: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(logits, labels)} if self.training and labels is not None else {}


class ZeroShotCLIP(_CLIPHolder):
    """Frozen CLIP with hand-written prompts (no trainable parameter)."""

    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str], template: str = DEFAULT_TEMPLATE):
        super().__init__(clip)
        self.register_buffer("text", zero_shot_text(clip, classnames, template), persistent=False)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Output:
        v = F.normalize(self.clip.encode_image(images, pruned=self._pruned()).float(), dim=-1)
        return self.clip.logit_scale.exp().float() * v @ self.text.t(), {}


class _CachedText:
    """Class text features from ``_encode_text`` (subclasses define it over ``self.prompt_learner``)."""

    def text_features(self) -> torch.Tensor:
        """Class text features (C, d). Without gradients they are computed once and reused until a
        prompt parameter changes (optimizer step, checkpoint load: both bump tensor versions), so
        evaluation does not re-encode every class prompt for every batch."""
        if torch.is_grad_enabled():
            return self._encode_text()
        key = tuple((p.data_ptr(), p._version) for p in self.prompt_learner.parameters())
        cached = getattr(self, "_text_cache", None)
        if cached is None or cached[0] != key:
            self._text_cache = (key, self._encode_text())
        return self._text_cache[1]

    def _encode_text(self) -> torch.Tensor:
        raise NotImplementedError


class CoOp(_CachedText, _CLIPHolder):
    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str], **prompt_kwargs):
        super().__init__(clip)
        self.prompt_learner = PromptLearner(clip, classnames, **prompt_kwargs)
        self.text_encoder = TextEncoder(clip)

    def _encode_text(self) -> torch.Tensor:
        return self.text_encoder(self.prompt_learner(), self.prompt_learner.tokenized_prompts).float()

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Output:
        v = F.normalize(self.clip.encode_image(images, pruned=self._pruned()).float(), dim=-1)
        t = F.normalize(self.text_features(), dim=-1)
        logits = self.clip.logit_scale.exp().float() * v @ t.t()
        return logits, self._ce(logits, labels)


class CoCoOp(_CLIPHolder):
    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str], **prompt_kwargs):
        super().__init__(clip)
        self.prompt_learner = CoCoOpPromptLearner(clip, classnames, **prompt_kwargs)
        self.text_encoder = TextEncoder(clip)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Output:
        v = F.normalize(self.clip.encode_image(images, pruned=self._pruned()).float(), dim=-1)
        prompts = self.prompt_learner(v)  # (B, C, L, w)
        tok = self.prompt_learner.tokenized_prompts
        s = self.clip.logit_scale.exp().float()
        logits = torch.stack([s * v[i] @ F.normalize(self.text_encoder(p, tok).float(), dim=-1).t()
                              for i, p in enumerate(prompts)])
        return logits, self._ce(logits, labels)


class MaPLe(_CLIPHolder):
    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str], **prompt_kwargs):
        super().__init__(clip)
        if clip.prune.active:
            raise ConfigError(f"MODEL.PRUNE.LAYERS = {list(clip.prune.layers)}: MaPLe's visual prompts do not "
                              "support token dropping; set MODEL.PRUNE.LAYERS [] for MaPLe.")
        depth = prompt_kwargs.get("depth", 1)
        layers = min(len(clip.model.transformer.resblocks), len(clip.model.visual.transformer.resblocks))
        if depth > layers:
            raise ConfigError(f"TRAINER.MAPLE.PROMPT_DEPTH = {depth} is invalid: expected at most the number "
                              f"of transformer layers of this CLIP ({layers}).")
        self.prompt_learner = MaPLePromptLearner(clip, classnames, **prompt_kwargs)
        self.text_encoder = TextEncoder(clip)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Output:
        prompts, deep_text, visual, deep_visual = self.prompt_learner()
        t = self.text_encoder(prompts, self.prompt_learner.tokenized_prompts, deep_text).float()
        v = self.clip.encode_image(images, visual, deep_visual).float()
        logits = self.clip.logit_scale.exp().float() * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).t()
        return logits, self._ce(logits, labels)


def check_prompt_depths(clip: FrozenCLIP, node_name: str, text_depth: int, vision_depth: int) -> None:
    """IVLP-style depths: text in [1, text layers], vision in [0, vision layers] (0 = no visual prompt)."""
    text_layers = len(clip.model.transformer.resblocks)
    if not isinstance(text_depth, int) or not 1 <= text_depth <= text_layers:
        raise ConfigError(f"TRAINER.{node_name}.PROMPT_DEPTH_TEXT = {text_depth!r} is invalid: expected an integer "
                          f"in [1, {text_layers}] (this CLIP's text transformer has {text_layers} blocks; 1 = the "
                          "input context only).")
    vision_layers = len(clip.model.visual.transformer.resblocks) if clip.is_vit else 0
    if not isinstance(vision_depth, int) or not 0 <= vision_depth <= vision_layers:
        raise ConfigError(f"TRAINER.{node_name}.PROMPT_DEPTH_VISION = {vision_depth!r} is invalid: expected an "
                          f"integer in [0, {vision_layers}] (this CLIP's vision transformer has {vision_layers} "
                          "blocks; 0 = no visual prompts).")


class IVLP(_CachedText, _CLIPHolder):
    """Independent vision-language prompting (Khattak et al.; the prompt design of PromptSRC).

    ``round_prompts``: round the prompts to fp16 where they enter the encoders, as the original code
    does in every precision (see :func:`spotlighter.backbone._prompt_tokens`)."""

    NODE = "IVLP"

    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str], n_text: int = 4, n_vision: int = 4,
                 ctx_init: str = "a photo of a", text_depth: int = 9, vision_depth: int = 9,
                 round_prompts: bool = True):
        super().__init__(clip)
        check_prompt_depths(clip, self.NODE, text_depth, vision_depth)
        if clip.prune.active and vision_depth >= 1:
            raise ConfigError(f"MODEL.PRUNE.LAYERS = {list(clip.prune.layers)}: {type(self).__name__}'s visual "
                              "prompts do not support token reduction; set MODEL.PRUNE.LAYERS [] (or "
                              f"TRAINER.{self.NODE}.PROMPT_DEPTH_VISION 0).")
        try:
            self.prompt_learner = IVLPPromptLearner(clip, classnames, n_text, n_vision, ctx_init, text_depth,
                                                    vision_depth)
        except ValueError as exc:
            raise ConfigError(f"TRAINER.{self.NODE}.N_CTX_TEXT / CTX_INIT: {exc}.") from None
        self.text_encoder = TextEncoder(clip)
        self.round_prompts = round_prompts

    def features(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm prompted image (B, d) and text (C, d) features, float32."""
        _, _, visual, deep_visual = self.prompt_learner()
        t = self.text_features()
        v = self.clip.encode_image(images, visual, deep_visual, pruned=self._pruned(),
                                   round_prompts=self.round_prompts)
        return F.normalize(v.float(), dim=-1), t

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Output:
        v, t = self.features(images)
        logits = self.clip.logit_scale.exp().float() * v @ t.t()
        return logits, self._ce(logits, labels)

    def _encode_text(self) -> torch.Tensor:
        """Unit-norm prompted text features of the classes (C, d), float32."""
        prompts, deep_text, _, _ = self.prompt_learner()
        t = self.clip.encode_text_embeddings(prompts, self.prompt_learner.tokenized_prompts, deep_text,
                                             round_prompts=self.round_prompts)
        return F.normalize(t.float(), dim=-1)

    def image_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Logits of the prompted image features against given unit-norm ``text`` (C, d) (a teacher's
        soft labels, its text features computed once)."""
        _, _, visual, deep_visual = self.prompt_learner()
        v = self.clip.encode_image(images, visual, deep_visual, pruned=self._pruned(), round_prompts=self.round_prompts)
        return self.clip.logit_scale.exp().float() * F.normalize(v.float(), dim=-1) @ text.t()


def ensemble_text(clip: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ENSEMBLE_TEMPLATES,
                  batch_size: int = 256) -> torch.Tensor:
    """Frozen-CLIP text features averaged over ``templates`` (C, d), float32, not normalised.

    As PromptSRC computes them: each template's features un-normalised, the mean over templates, in
    float32 from the CLIP's weights (an fp16 CLIP is encoded by a float32 copy of its text tower)."""
    names = [n.replace("_", " ") for n in classnames]
    for t in templates:
        check_class_prompts(clip, classnames, [t.replace("{}", n) for n in names], f"use a shorter prompt template than {t!r}")
    encoder = clip if clip.dtype == torch.float32 else FrozenCLIP(_float_text_copy(clip.model))
    # (the float32 copy is dropped on return)
    per_template = [encoder.encode_text([t.replace("{}", n) for n in names], batch_size).float().unsqueeze(1)
                    for t in templates]
    return torch.cat(per_template, dim=1).mean(dim=1)


def _float_text_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of a (half-precision) CLIP, as PromptSRC builds one for its ensemble text."""
    import copy

    return copy.deepcopy(model).float()


class PromptSRC(IVLP):
    """PromptSRC (Khattak et al., ICCV 2023): IVLP prompts regularised towards the frozen CLIP.

    Training loss = CE + KL(frozen || prompted) over the classes (the frozen model's logits use the
    60-template ensemble text) + ``text_weight`` * L1(prompted text, ensemble text) + ``image_weight`` *
    L1(prompted image, frozen image), all features unit-norm. Gaussian prompt aggregation over the
    epochs is the trainer's (:class:`GaussianPromptAggregation`)."""

    NODE = "PROMPTSRC"

    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str], text_weight: float = 25.0,
                 image_weight: float = 10.0, **ivlp_kwargs):
        super().__init__(clip, classnames, **ivlp_kwargs)
        self.text_weight = float(text_weight)
        self.image_weight = float(image_weight)
        fixed = ensemble_text(clip, classnames)
        self.register_buffer("fixed_embeddings", fixed, persistent=False)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Output:
        v, t = self.features(images)
        s = self.clip.logit_scale.exp().float()
        logits = s * v @ t.t()
        if not (self.training and labels is not None):
            return logits, {}
        fixed = F.normalize(self.fixed_embeddings, dim=-1)
        with torch.no_grad():
            zs = F.normalize(self.clip.encode_image(images, pruned=self._pruned()).float(), dim=-1)
            zs_logits = s * zs @ fixed.t()
        kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(zs_logits, dim=1), reduction="sum",
                      log_target=True) / logits.numel()
        return logits, {
            "ce": F.cross_entropy(logits, labels),
            "scl_logits": kl,
            "scl_text": F.l1_loss(t, fixed, reduction="mean") * self.text_weight,
            "scl_image": F.l1_loss(v, zs, reduction="mean") * self.image_weight,
        }


class GaussianPromptAggregation:
    """PromptSRC's GPA: the weighted sum over epochs e = 1..N of the trained state at the end of epoch
    e, weight w_e = N(e; mean, std) / sum_e' N(e'; mean, std).

    The weights are computed as the original computes them (float64, normalised by a left-to-right
    sum), each state is multiplied by its weight and added to the running sum, and the aggregate
    replaces the trained state after the last epoch. Only the learnable tensors are aggregated (the
    original aggregates the entire state dict, the frozen CLIP included: see docs/method.md)."""

    def __init__(self, mean: float, std: float, epochs: int):
        if not (isinstance(std, (int, float)) and std > 0 and math.isfinite(std)):
            raise ConfigError(f"TRAINER.PROMPTSRC.GPA_STD = {std!r} is invalid: expected a number > 0.")
        if not (isinstance(mean, (int, float)) and math.isfinite(mean)):
            raise ConfigError(f"TRAINER.PROMPTSRC.GPA_MEAN = {mean!r} is invalid: expected a finite number.")
        self.weights = gpa_weights(mean, std, epochs)
        self.sum: Optional[Dict[str, torch.Tensor]] = None
        self.epochs_added = 0

    def add(self, state: Dict[str, torch.Tensor], epoch: int) -> None:
        """Add the state at the end of ``epoch`` (1-based) with its weight."""
        if epoch != self.epochs_added + 1:
            raise RuntimeError(f"GPA: epoch {epoch} added after epoch {self.epochs_added}")
        w = float(self.weights[epoch - 1])
        weighted = {k: v.detach() * w for k, v in state.items()}
        self.sum = weighted if self.sum is None else {k: self.sum[k] + weighted[k] for k in self.sum}
        self.epochs_added = epoch

    def state_dict(self) -> Dict[str, object]:
        return {"epochs_added": self.epochs_added, "sum": self.sum}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.epochs_added = int(state["epochs_added"])
        self.sum = state["sum"]


def gpa_weights(mean: float, std: float, epochs: int) -> List[float]:
    """Normalised Gaussian weights of epochs 1..``epochs``, computed with numpy's float64 operations
    in the original's order (its normalising sum is Python's left-to-right ``sum``)."""
    import numpy as np

    dens = np.array([(1 / (std * np.sqrt(2 * np.pi))) * np.exp(-0.5 * ((e - mean) / std) ** 2)
                     for e in range(1, epochs + 1)])
    total = sum(dens)
    if not total > 0:
        raise ConfigError(f"TRAINER.PROMPTSRC.GPA_MEAN = {mean} / GPA_STD = {std}: every epoch of 1..{epochs} "
                          "gets weight 0 (the mean lies too many standard deviations outside the schedule); "
                          "choose a mean within OPTIM.MAX_EPOCH or a larger GPA_STD.")
    return [float(w) for w in dens / total]


class Spotlighter(CoOp):
    """CoOp w/ Spotlighter: CoOp's prompt learner plus :class:`SpotlighterHead`."""

    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str], head_cfg: HeadConfig, **prompt_kwargs):
        super().__init__(clip, classnames, **prompt_kwargs)
        left = clip.prune.remaining(clip.num_patches)
        if head_cfg.top_k > left:
            raise ConfigError(f"TRAINER.SPOTLIGHTER.TOP_K = {head_cfg.top_k} is invalid: MODEL.PRUNE (LAYERS "
                              f"{list(clip.prune.layers)}, KEEP {clip.prune.keep}) leaves {left} patch tokens; "
                              f"expected at most {left} (or a larger MODEL.PRUNE.KEEP).")
        class_text = zero_shot_text(clip, classnames) if head_cfg.memory_kind == "class" else None
        self.head = SpotlighterHead(head_cfg, clip.embed_dim, classnames, class_text)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Output:
        img = self.clip.encode_image_tokens(images, need_attn=self.head.cfg.score.attn > 0,
                                            pruned=self._pruned())
        out = self.head(img, self.text_features(), self.clip.logit_scale, labels)
        self.stats = out.stats or {}  # the selected tokens' statistics of this (training) forward
        return out.logits, out.losses

    def _memory(self) -> Optional[ClassMemory]:
        memory = self.head.memory
        return memory if isinstance(memory, ClassMemory) else None

    def class_state(self) -> Optional[dict]:
        """The class prototypes with their class names (None without a class memory)."""
        memory = self._memory()
        return memory.class_state() if memory is not None else None

    def load_class_state(self, state: dict) -> Optional[Tuple[int, int]]:
        """Load saved prototypes by class name: (classes loaded, classes left at their zero-shot text
        init), or None without a class memory. A saved memory of another shape is a ValueError."""
        memory = self._memory()
        if memory is None:
            return None
        saved = state.get("prototypes")
        if getattr(saved, "dim", lambda: 0)() != 3:
            raise ValueError("class_state['prototypes'] is not a (classes, prototypes, dim) tensor")
        if saved.shape[1] != memory.per_class:
            raise ValueError(
                f"class_state['prototypes'] holds {saved.shape[1]} prototypes per class, but "
                f"TRAINER.SPOTLIGHTER.MEMORY.PROTOTYPES_PER_CLASS = {memory.per_class}: evaluate it with the "
                f"value it was trained with ({saved.shape[1]})")
        if saved.shape[2] != memory.prototypes.shape[2]:
            raise ValueError(f"class_state['prototypes'] has dimension {saved.shape[2]}, this CLIP's embedding "
                             f"{memory.prototypes.shape[2]}: it was trained with another MODEL.BACKBONE")
        return memory.load_class_state(state)


def count_trainable(module: nn.Module) -> int:
    """Trainable scalars (not tensors: the released code's "21 parameters" counted tensors)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
