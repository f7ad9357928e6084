"""Spotlighter on PromptKD (the paper's headline row, "PromptKD w/ Spotlighter") and TextRefiner on
PromptKD, as presets of one model (``TRAINER.SPOTLIGHTERKD.PRESET``; docs/method.md lists each).

On top of the PromptKD student (:class:`spotlighter.kd.PromptKD`) the model adds:

* a token branch: a second projector maps the student's last-block tokens to the teacher's width;
  the top-k patches (by the last block's CLS attention in ``release``), with the CLS and mean tokens,
  are distilled against the teacher's soft labels as one set and as two levels (ranks 1-2, 3-5);
* a slot memory written with the mapped tokens, read by the text refinement (TRM) of the teacher's
  class text;
* an image refinement (IRM) of the student feature, fused with it.

Shapes: B images, N = 1 + P tokens (CLS first), C classes, d the teacher's embedding width.
Every loss is a multiple of ``TRAINER.PROMPTKD.KD_WEIGHT``; all are KL divergences to the teacher's
soft labels (no label is used), plus two L1 consistency terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import FrozenCLIP
from .config import ConfigError
from .kd import FeatureProjector, PromptKD
from .method import (ClassMemory, ImageRefiner, ScoreWeights, TextRefiner, gather_tokens, level_weights,
                     select_top_k, token_scores)
from .models import IVLP, Output

#: The memory kinds (``MEMORY.KIND``), image refinements (``IRM.KIND``) and memory writes (``MEMORY.WRITE``).
MEMORY_KINDS = ("shared", "class")
IRM_KINDS = ("single_key", "tokens", "none")
MEMORY_WRITES = ("all", "selected")


@dataclass
class KDHeadConfig:
    """Flat view of ``cfg.TRAINER.SPOTLIGHTERKD`` (its defaults live in spotlighter/config.py)."""

    top_k: int
    level_sizes: Tuple[int, ...]
    score: ScoreWeights
    memory_kind: str
    slots: int
    prototypes_per_class: int
    momentum: float
    read_temperature: float
    memory_write: str
    memory_seed: int
    alpha: float
    irm_kind: str
    irm_heads: int
    irm_dropout: float
    beta: float
    normalize_fused: bool
    sem_weight: float
    level_weight: float
    mem_weight: float
    img_weight: float
    dynamic_level_weights: bool

    @classmethod
    def from_cfg(cls, node) -> "KDHeadConfig":
        return cls(
            top_k=node.TOP_K, level_sizes=tuple(node.LEVEL_SIZES),
            score=ScoreWeights(node.SCORE.SAMPLE_WEIGHT, node.SCORE.SEMANTIC_WEIGHT, node.SCORE.ATTN_WEIGHT,
                               node.SCORE.EPS),
            memory_kind=node.MEMORY.KIND, slots=node.MEMORY.SLOTS,
            prototypes_per_class=node.MEMORY.PROTOTYPES_PER_CLASS, momentum=node.MEMORY.MOMENTUM,
            read_temperature=node.MEMORY.READ_TEMPERATURE, memory_write=node.MEMORY.WRITE,
            memory_seed=node.MEMORY.INIT_SEED, alpha=node.TRM.ALPHA, irm_kind=node.IRM.KIND,
            irm_heads=node.IRM.HEADS, irm_dropout=node.IRM.DROPOUT, beta=node.FUSION.BETA,
            normalize_fused=node.FUSION.NORMALIZE, sem_weight=node.LOSS.SEM_WEIGHT,
            level_weight=node.LOSS.LEVEL_WEIGHT, mem_weight=node.LOSS.MEM_WEIGHT, img_weight=node.LOSS.IMG_WEIGHT,
            dynamic_level_weights=node.LOSS.LEVEL_WEIGHTS == "dynamic")

    @property
    def attention_only(self) -> bool:
        """Selection by the raw CLS attention (standardising one term would not change the order)."""
        s = self.score
        return not s.sample and not s.semantic and s.attn > 0


def kl_to(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """PromptKD's KL(teacher || student): summed, divided by rows x classes, times T^2."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), teacher_probs, reduction="sum") * (t * t) \
        / student_logits.numel()


def kl_rows(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row KL(teacher || student) divided by the classes, times T^2: the mean of these is :func:`kl_to`."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), teacher_probs, reduction="none").sum(dim=1)
    return kl * (t * t) / student_logits.shape[1]


class SlotMemory(nn.Module):
    """The released memory: ``slots`` unit-norm entries shared by all classes (a persistent buffer, so
    checkpoints save it and resumes restore it).

    Reads: softmax over the slots of x Pᵀ / T, times P (x as given; :meth:`read_normalized` normalises
    x first). Write (:meth:`write`): every token goes to the slot of its highest score; slot i moves to
    μ·P_i + (1-μ)·Σ_j (Q_ji / max_j' Q_j'i)·x_j over its tokens (Q: softmax over the tokens), a sum as
    released; then all rows are re-normalised."""

    def __init__(self, slots: int, dim: int, momentum: float, temperature: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("slots", F.normalize(torch.rand(slots, dim, generator=g), dim=-1))
        self.momentum = momentum
        self.temperature = temperature

    def _weights(self, x: torch.Tensor) -> torch.Tensor:
        score = x @ self.slots.t()
        return (score if self.temperature == 1.0 else score / self.temperature).softmax(dim=1)

    def read(self, x: torch.Tensor) -> torch.Tensor:
        return self._weights(x) @ self.slots

    def read_normalized(self, x: torch.Tensor) -> torch.Tensor:
        return self.read(F.normalize(x, dim=-1))

    read_own = read

    def keys(self) -> torch.Tensor:
        return self.slots

    @torch.no_grad()
    def write(self, tokens: torch.Tensor) -> None:
        """``tokens`` (n, d), un-normalised. Slot by slot, summing in the released order."""
        slots = self.slots
        x = F.normalize(tokens.reshape(-1, slots.shape[1]).to(slots.dtype), dim=-1)
        score = x @ slots.t()
        over_tokens = score.softmax(dim=0)
        nearest = score.softmax(dim=1).topk(1, dim=1)[1].squeeze(1)  # top-1 of the slot softmax, as released
        updated = slots.clone()
        for i in range(slots.shape[0]):
            idx = torch.nonzero(nearest == i)
            if idx.shape[0]:
                w = over_tokens[idx, i] / over_tokens[:, i].max()
                updated[i] = self.momentum * slots[i] + (1 - self.momentum) * torch.sum(w * x[idx.squeeze(1)], dim=0)
        self.slots = F.normalize(updated, dim=-1)


class SingleKeyRefiner(nn.Module):
    """The released IRM: 8-head attention with query v, key imageread(v) and value v. Each query has
    exactly one key, so its softmax is exactly 1 (dropped out to 0 or 1/(1-p) per head in training):
    the output is ``out(dropout(1) ⊙ value(v))``, and the query and key projections and the memory
    read get exactly zero gradient (weight decay alone moves them). Computed as released, all of it,
    so that gradients are summed in the released order (bit-exact with it)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"TRAINER.SPOTLIGHTERKD.IRM.HEADS = {heads} must divide the teacher's embedding "
                              f"width {dim}")
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, dim)

    def forward(self, v: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """v (B, d) the queries and values; key (B, d) one key per query."""
        B, d = v.shape
        hd = d // self.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(B, -1, self.heads, hd).transpose(1, 2)

        q, k, values = heads(self.query(v.unsqueeze(1))), heads(self.key(key.unsqueeze(1))), heads(self.value(v.unsqueeze(1)))
        scores = torch.matmul(q, k.transpose(-2, -1)) / torch.sqrt(torch.tensor(hd, dtype=torch.float32))
        weights = self.dropout(F.softmax(scores, dim=-1))
        out = torch.matmul(weights, values).transpose(1, 2).contiguous().view(B, -1, d)
        return self.out(out).squeeze(1)


@dataclass
class TokenBranch:
    mapped: torch.Tensor  # (B, N, d) every token through the token projector
    sets: List[torch.Tensor]  # [all, level 1, level 2 ...]: each (B, n_i, d) = [CLS, selected, mean]
    selected: torch.Tensor  # (B, k, d) mapped selected tokens, ranked
    top_scores: torch.Tensor  # (B, k)


class SpotlighterKD(PromptKD):
    """PromptKD's student with Spotlighter's token branch, memory, TRM and IRM (see the module doc)."""

    NODE = "SPOTLIGHTERKD"

    def __init__(self, clip: FrozenCLIP, teacher: IVLP, classnames: Sequence[str], head: KDHeadConfig,
                 n_vision: int = 4,
                 vision_depth: int = 9, round_prompts: bool = True, kd_weight: float = 1.0,
                 temperature: float = 1.0):
        super().__init__(clip, teacher, n_vision=n_vision, vision_depth=vision_depth, round_prompts=round_prompts,
                         kd_weight=kd_weight, temperature=temperature)
        check_head(head, clip.prune.remaining(clip.num_patches) if clip.prune.active else clip.num_patches)
        self.head = head
        d = self.teacher_text.shape[1]
        self.mid_image_trans = FeatureProjector(clip.embed_dim, d)
        if head.memory_kind == "class":
            self.memory: nn.Module = ClassMemory(self.teacher_text, classnames, head.prototypes_per_class,
                                                 head.momentum, head.read_temperature)
        else:
            self.memory = SlotMemory(head.slots, d, head.momentum, head.read_temperature, head.memory_seed)
        self.trm = TextRefiner(d, head.alpha)
        if head.irm_kind == "single_key":
            self.irm: Optional[nn.Module] = SingleKeyRefiner(d, head.irm_heads, head.irm_dropout)
        elif head.irm_kind == "tokens":
            self.irm = ImageRefiner(d, head.irm_heads, head.irm_dropout)
        else:
            self.irm = None

    def trainable_groups(self) -> Dict[str, nn.Module]:
        """The released code's two registered modules: the student (prompts and both projectors; the
        seeds' "21 extra parameters" at depth 9) and the memory (TRM and IRM weights)."""
        student = nn.ModuleList([self.prompt_learner, self.VPT_image_trans, self.mid_image_trans])
        memory = nn.ModuleList([m for m in (self.trm, self.irm) if m is not None])
        return {"student": student, "memory": memory}

    # ------------------------------------------------------------------ branches
    def _tokens(self, images: torch.Tensor):
        visual, deep = self.prompt_learner.visual()
        img = self.clip.encode_image_tokens(images, need_attn=True, pruned=self._pruned(), shallow_prompt=visual,
                                            deep_prompts=deep, round_prompts=self.round_prompts)
        v = F.normalize(self.VPT_image_trans(img.global_feat.float()), dim=-1)
        return img, v

    def _token_branch(self, img, probs: Optional[torch.Tensor]) -> TokenBranch:
        h = self.head
        tokens = img.tokens.float()
        B, N, w = tokens.shape
        mapped = self.mid_image_trans(tokens.reshape(B * N, w)).reshape(B, N, -1)
        with torch.no_grad():
            if h.attention_only:
                top_scores, token_idx = img.cls_attn.float().topk(h.top_k, dim=-1)
                token_idx = token_idx + 1
            else:
                patches = F.normalize(mapped[:, 1:].detach(), dim=-1)
                protos = self.memory.prototypes if isinstance(self.memory, ClassMemory) else None
                scores = token_scores(patches, probs, self.teacher_text, protos, img.cls_attn, h.score)
                top_scores, token_idx = select_top_k(scores, h.top_k)
        groups = [token_idx]
        start = 0
        for size in h.level_sizes:
            groups.append(token_idx[:, start:start + size])
            start += size
        # each set: [CLS, its selected tokens, the mean of all tokens], CLS gathered with them (token 0);
        # the gathers, the mean and the concatenations in the released order (gradients sum in it)
        gathered = [gather_tokens(mapped, torch.cat([g.new_zeros(B, 1), g], dim=1)) for g in groups]
        mean = mapped.mean(dim=1, keepdim=True)
        sets = [torch.cat([x, mean], dim=1) for x in gathered]
        return TokenBranch(mapped=mapped, sets=sets, selected=sets[0][:, 1:-1], top_scores=top_scores)

    def _refine_image(self, v: torch.Tensor, branch: Optional[TokenBranch]) -> Optional[torch.Tensor]:
        h = self.head
        if h.irm_kind == "single_key":
            return self.irm(v, self.memory.read_normalized(v))
        if h.irm_kind == "tokens":
            sel = branch.selected
            rep = sel + self.irm(sel, self.memory.keys())
            return (branch.top_scores.softmax(dim=1).unsqueeze(-1) * rep).sum(dim=1)
        return None

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Output:
        h = self.head
        s = self.clip.logit_scale.exp().float()
        t = self.teacher_text
        img, v = self._tokens(images)
        teacher_probs = None
        if self.training:
            with torch.no_grad():
                teacher_logits = self.teacher.image_logits(images, t)
                teacher_probs = F.softmax(teacher_logits / self.temperature, dim=1)
        need_branch = self.training or h.irm_kind == "tokens"
        branch = self._token_branch(img, teacher_probs if self.training else F.softmax(s * v @ t.t(), dim=1)) \
            if need_branch else None
        refined_text = self.trm(t, self.memory.read_own(t))
        o = self._refine_image(v, branch)
        lam = self.kd_weight
        terms: Dict[str, torch.Tensor] = {}
        if self.training:  # the memory's terms before the fusion, as released (the order gradients sum in)
            self._write(branch, teacher_probs)
            terms["mem"] = lam * h.mem_weight * F.l1_loss(F.normalize(refined_text, dim=-1), t)
            if o is not None:
                terms["img"] = lam * h.img_weight * F.l1_loss(F.normalize(o, dim=-1), v)
        if o is not None:
            o_fused = F.normalize(o, dim=-1) if h.normalize_fused else o
            f = v * (1 - h.beta) + o_fused * h.beta
        else:
            f = v
        logits = s * f @ refined_text.t()
        if not self.training:
            return logits, {}

        losses: Dict[str, torch.Tensor] = {"kd": lam * kl_to(logits, teacher_probs, self.temperature)}
        set_losses = self._set_losses(branch, s, t, teacher_probs)
        losses["sem"] = lam * h.sem_weight * set_losses[0]
        for i, term in enumerate(set_losses[1:]):
            losses[f"level{i + 1}"] = lam * h.level_weight * term
        losses.update(terms)
        return logits, losses

    def _set_losses(self, branch: TokenBranch, s: torch.Tensor, t: torch.Tensor,
                    teacher_probs: torch.Tensor) -> List[torch.Tensor]:
        """KL of every token of each set (all, then the levels) to its image's teacher soft labels."""
        h = self.head
        B = teacher_probs.shape[0]
        if not h.dynamic_level_weights:
            out = []
            for members in branch.sets:
                z = s * members.reshape(-1, members.shape[-1]) @ t.t()
                out.append(kl_to(z, teacher_probs.repeat_interleave(members.shape[1], dim=0), self.temperature))
            return out
        # dynamic: each image's set losses weighted by the softmax of the sets' mean scores (levels, then all)
        w = level_weights(branch.top_scores, h.level_sizes, True, include_all=True)
        w = torch.cat([w[:, -1:], w[:, :-1]], dim=1) * w.shape[1]  # order [all, levels], mean weight 1
        out = []
        for i, members in enumerate(branch.sets):
            n = members.shape[1]
            z = s * members.reshape(-1, members.shape[-1]) @ t.t()
            rows = kl_rows(z, teacher_probs.repeat_interleave(n, dim=0), self.temperature).view(B, n).mean(dim=1)
            out.append((w[:, i] * rows).mean())
        return out

    @torch.no_grad()
    def _write(self, branch: TokenBranch, teacher_probs: torch.Tensor) -> None:
        h = self.head
        if isinstance(self.memory, SlotMemory):
            if h.memory_write == "all":
                self.memory.write(branch.mapped.detach())
            else:
                self.memory.write(branch.selected.detach())
            return
        # class memory: each image's selected tokens go to the prototypes of the teacher's top class
        sel = branch.selected.detach()
        labels = teacher_probs.argmax(dim=1).repeat_interleave(sel.shape[1])
        self.memory.write(sel.flatten(0, 1), labels, branch.top_scores.flatten())


def check_head(h: KDHeadConfig, num_patches: int) -> None:
    """The head's keys against each other and the CLIP (errors name the key and what was expected)."""
    p = "TRAINER.SPOTLIGHTERKD."
    if not 1 <= h.top_k <= num_patches:
        raise ConfigError(f"{p}TOP_K = {h.top_k} is invalid: expected 1..{num_patches} (the patch tokens that reach "
                          "the last block of this CLIP, after MODEL.PRUNE).")
    if h.level_sizes and (sum(h.level_sizes) != h.top_k or min(h.level_sizes) < 1):
        raise ConfigError(f"{p}LEVEL_SIZES = {list(h.level_sizes)} is invalid: expected positive sizes adding up "
                          f"to TOP_K = {h.top_k}, or [] (no levels, as TextRefiner).")
    for key, value, options in (("MEMORY.KIND", h.memory_kind, MEMORY_KINDS), ("IRM.KIND", h.irm_kind, IRM_KINDS),
                                ("MEMORY.WRITE", h.memory_write, MEMORY_WRITES)):
        if value not in options:
            raise ConfigError(f"{p}{key} = {value!r} is invalid: expected one of {list(options)}.")
    if h.irm_kind == "tokens" and h.memory_kind != "class":
        raise ConfigError(f"{p}IRM.KIND tokens attends over class prototypes: set MEMORY.KIND class.")
    if h.memory_kind == "class" and h.memory_write != "selected":
        raise ConfigError(f"{p}MEMORY.KIND class is written with the selected tokens: set MEMORY.WRITE selected.")
    if h.score.semantic and h.memory_kind != "class":
        raise ConfigError(f"{p}SCORE.SEMANTIC_WEIGHT needs class prototypes: set MEMORY.KIND class.")
    if not 0 <= h.beta <= 1:
        raise ConfigError(f"{p}FUSION.BETA = {h.beta} is invalid: expected 0..1.")
    if h.irm_kind == "none" and (h.beta or h.img_weight):
        raise ConfigError(f"{p}IRM.KIND none has no refined image feature: set FUSION.BETA 0 and LOSS.IMG_WEIGHT 0.")
    if not h.read_temperature > 0:
        raise ConfigError(f"{p}MEMORY.READ_TEMPERATURE = {h.read_temperature} is invalid: expected > 0.")
