"""The five models as plain ``nn.Module``s: trainable parts as submodules, the frozen CLIP held
outside the module tree (so ``state_dict()`` never contains it).

Every model's ``forward(images, labels=None)`` returns ``(logits, losses)``; ``losses`` is a dict of
weighted loss terms when training with labels, empty otherwise.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import FrozenCLIP
from .config import ConfigError
from .method import HeadConfig, SpotlighterHead
from .prompt import CoCoOpPromptLearner, MaPLePromptLearner, PromptLearner, TextEncoder
from .templates import DEFAULT_TEMPLATE

Output = Tuple[torch.Tensor, Dict[str, torch.Tensor]]


def zero_shot_text(clip: FrozenCLIP, classnames: Sequence[str], template: str = DEFAULT_TEMPLATE) -> torch.Tensor:
    """Unit-norm frozen-CLIP text features of ``template.format(name)`` (C, d), float32."""
    texts = [template.format(n.replace("_", " ")) for n in classnames]
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


class CoOp(_CLIPHolder):
    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str], **prompt_kwargs):
        super().__init__(clip)
        self.prompt_learner = PromptLearner(clip, classnames, **prompt_kwargs)
        self.text_encoder = TextEncoder(clip)

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
        return out.logits, out.losses


def count_trainable(module: nn.Module) -> int:
    """Trainable scalars (not tensors: the released code's "21 parameters" counted tensors)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
