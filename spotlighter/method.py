"""Spotlighter's components (plain torch): token scoring, top-k selection and two-level ranking,
token mapping, class-prototype / shared memory, text and image refinement, losses.

Shapes: B images, N = 1 + P tokens (CLS first), P patches, C classes, d joint embedding width,
m prototypes per class. Patch index ``n`` is token index ``n + 1`` (the released code forgot the +1).
All computations here run in float32; callers cast backbone outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import ImageTokens


# --------------------------------------------------------------------------- scoring and selection
def standardize(x: torch.Tensor, eps: float, dim: int = -1) -> torch.Tensor:
    """Zero mean, unit (population) std along ``dim``."""
    mean = x.mean(dim=dim, keepdim=True)
    std = x.std(dim=dim, keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)


def sample_wise_score(patches: torch.Tensor, probs: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """a_n = sum_c p_c cos(z_n, t_c); patches (B, P, d) and text (C, d) unit-norm, probs (B, C)."""
    return torch.einsum("bpd,bd->bp", patches, probs @ text)


def semantic_wise_score(patches: torch.Tensor, probs: torch.Tensor, prototypes: torch.Tensor,
                        class_chunk: int = 256) -> torch.Tensor:
    """b_n = sum_c p_c max_j cos(z_n, P_cj); prototypes (C, m, d) unit-norm. Chunked over classes.

    One matrix product per chunk with the prototypes laid out prototype-major, (m * c, d), so the max
    over the m prototypes runs over m contiguous (B, P, c) slabs rather than a stride-1 axis of length m
    (the same numbers, ~15 % less time at 1000 classes)."""
    B, P, d = patches.shape
    m = prototypes.shape[1]
    flat = patches.reshape(B * P, d)
    out = patches.new_zeros(B, P)
    for start in range(0, prototypes.shape[0], class_chunk):
        protos = prototypes[start:start + class_chunk]
        c = protos.shape[0]
        sims = (flat @ protos.transpose(0, 1).reshape(m * c, d).t()).view(B, P, m, c).amax(dim=2)  # (B, P, c)
        out = out + torch.einsum("bpc,bc->bp", sims, probs[:, start:start + class_chunk])
    return out


@dataclass
class ScoreWeights:
    """TRAINER.SPOTLIGHTER.SCORE (defaults: spotlighter/config.py)."""

    sample: float
    semantic: float
    attn: float
    eps: float


def token_scores(patches: torch.Tensor, probs: torch.Tensor, text: torch.Tensor,
                 prototypes: Optional[torch.Tensor], cls_attn: Optional[torch.Tensor],
                 weights: ScoreWeights) -> torch.Tensor:
    """Label-free score of every patch (B, P): weighted sum of standardised terms (spec section 4)."""
    score = patches.new_zeros(patches.shape[:2])
    if weights.sample:
        score = score + weights.sample * standardize(sample_wise_score(patches, probs, text), weights.eps)
    if weights.semantic:
        if prototypes is None:
            raise ValueError("the semantic-wise score needs class prototypes")
        score = score + weights.semantic * standardize(
            semantic_wise_score(patches, probs, prototypes), weights.eps)
    if weights.attn:
        if cls_attn is None:
            raise ValueError("the attention score needs the last block's CLS attention")
        score = score + weights.attn * standardize(cls_attn.float(), weights.eps)
    return score


def select_top_k(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k patches by score, ranked (highest first): (values (B, k), *token* indices (B, k))."""
    values, patch_idx = scores.topk(k, dim=-1, largest=True, sorted=True)
    return values, patch_idx + 1


def gather_tokens(tokens: torch.Tensor, token_idx: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, d), token_idx (B, k) -> (B, k, d)."""
    return tokens.gather(1, token_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def split_levels(x: torch.Tensor, sizes: Sequence[int]) -> List[torch.Tensor]:
    """Split ranked items along dim 1 into Level-1, Level-2, ... of the given sizes."""
    if sum(sizes) != x.shape[1]:
        raise ValueError(f"level sizes {list(sizes)} do not add up to {x.shape[1]}")
    return list(torch.split(x, list(sizes), dim=1))


def level_weights(top_scores: torch.Tensor, sizes: Sequence[int], dynamic: bool,
                  include_all: bool) -> torch.Tensor:
    """(B, L) weights of the levels (+ the "all" set): softmax of each set's mean score, or ones."""
    means = [s.mean(dim=1) for s in split_levels(top_scores, sizes)]
    if include_all:
        means.append(top_scores.mean(dim=1))
    means_t = torch.stack(means, dim=1)
    if dynamic:
        return means_t.softmax(dim=1)
    return torch.ones_like(means_t)


# --------------------------------------------------------------------------- modules
class TokenMapper(nn.Module):
    """g: 1x1-conv MLP d -> hidden -> d with BatchNorm over all tokens, applied token-wise."""

    def __init__(self, dim: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Conv1d(dim, hidden, 1), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Conv1d(hidden, dim, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, d)
        return self.net(tokens.transpose(1, 2)).transpose(1, 2)


def attention_read(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(cos(q, k) / T) @ k over the last two dims."""
    sims = F.normalize(queries, dim=-1) @ keys.transpose(-1, -2)
    return (sims / temperature).softmax(dim=-1) @ keys


class ClassMemory(nn.Module):
    """m unit-norm prototypes per class, keyed by class name (spec section 5).

    ``prototypes`` is a non-persistent buffer: it is class-dependent, so checkpoints store it with
    its class names (:meth:`class_state`) and :meth:`load_class_state` maps it back by name.
    """

    def __init__(self, class_text: torch.Tensor, classnames: Sequence[str], per_class: int,
                 momentum: float, temperature: float):
        super().__init__()
        if class_text.shape[0] != len(classnames):
            raise ValueError("one text embedding per class name is needed")
        shared = sorted({n for n in classnames if list(classnames).count(n) > 1})
        if shared:  # prototypes are saved and loaded by name: they would go to the wrong class
            raise ValueError(f"the class memory needs distinct class names; {shared} name several classes")
        protos = F.normalize(class_text.float(), dim=-1).unsqueeze(1).repeat(1, per_class, 1)
        self.register_buffer("prototypes", protos, persistent=False)  # (C, m, d)
        self.classnames = list(classnames)
        self.momentum = momentum
        self.temperature = temperature

    @property
    def per_class(self) -> int:
        return self.prototypes.shape[1]

    def keys(self) -> torch.Tensor:
        return self.prototypes.flatten(0, 1)

    def read_own(self, text: torch.Tensor) -> torch.Tensor:
        """Each class query t_c (C, d) reads its own class's prototypes -> (C, d)."""
        return attention_read(text.unsqueeze(1), self.prototypes, self.temperature).squeeze(1)

    def read(self, queries: torch.Tensor) -> torch.Tensor:
        return attention_read(queries, self.keys(), self.temperature)

    @torch.no_grad()
    def write(self, tokens: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor) -> None:
        """tokens (n, d) of images with ``labels`` (n,); each goes to the nearest prototype of its
        class; each prototype moves by EMA towards the softmax(score)-weighted mean of its tokens."""
        tokens = F.normalize(tokens.float(), dim=-1)
        C, m, d = self.prototypes.shape
        own = self.prototypes[labels]  # (n, m, d)
        nearest = torch.einsum("nd,nmd->nm", tokens, own).argmax(dim=1)
        key = labels * m + nearest
        flat = self.prototypes.reshape(C * m, d)
        top = torch.full((C * m,), float("-inf"), device=tokens.device).scatter_reduce(
            0, key, scores.float(), reduce="amax", include_self=True)
        e = (scores.float() - top[key]).exp()
        denom = torch.zeros(C * m, device=tokens.device).index_add(0, key, e)
        w = e / denom[key]
        mean = torch.zeros_like(flat).index_add(0, key, w.unsqueeze(1) * tokens)
        touched = denom > 0
        updated = flat.clone()
        updated[touched] = F.normalize(self.momentum * flat[touched] + (1 - self.momentum) * mean[touched],
                                       dim=-1)
        self.prototypes = updated.reshape(C, m, d)  # out of place: autograd may hold the old one

    def class_state(self) -> Dict[str, object]:
        return {"classnames": list(self.classnames), "prototypes": self.prototypes.detach().cpu()}

    @torch.no_grad()
    def load_class_state(self, state: Dict[str, object]) -> Tuple[int, int]:
        """Copy saved prototypes for the classes both have; return (loaded, kept from text init)."""
        saved = state["prototypes"]
        names = list(state["classnames"])
        if saved.shape[1:] != self.prototypes.shape[1:]:
            raise ValueError(f"saved prototypes have shape {tuple(saved.shape[1:])} per class, "
                             f"this memory {tuple(self.prototypes.shape[1:])}")
        index = {n: i for i, n in enumerate(names)}
        protos = self.prototypes.clone()
        loaded = 0
        for c, name in enumerate(self.classnames):
            if name in index:
                protos[c] = saved[index[name]].to(protos)
                loaded += 1
        self.prototypes = protos
        return loaded, len(self.classnames) - loaded


class SharedMemory(nn.Module):
    """Slots shared by all classes, written with every mapped token (the released code's memory)."""

    def __init__(self, slots: int, dim: int, momentum: float, temperature: float, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("slots", F.normalize(torch.rand(slots, dim, generator=g), dim=-1))
        self.momentum = momentum
        self.temperature = temperature

    def keys(self) -> torch.Tensor:
        return self.slots

    def read(self, queries: torch.Tensor) -> torch.Tensor:
        return attention_read(queries, self.slots, self.temperature)

    read_own = read

    @torch.no_grad()
    def write(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
              scores: Optional[torch.Tensor] = None) -> None:
        """Released rule: each token goes to its nearest slot, weighted by its softmax-over-tokens
        score for that slot relative to the slot's best token; slot <- mu*slot + (1-mu)*sum."""
        tokens = F.normalize(tokens.float(), dim=-1)
        sims = tokens @ self.slots.t() / self.temperature  # (n, S)
        over_tokens = sims.softmax(dim=0)
        slot = sims.argmax(dim=1)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        w = over_tokens[rows, slot] / over_tokens.amax(dim=0)[slot]
        agg = torch.zeros_like(self.slots).index_add(0, slot, w.unsqueeze(1) * tokens)
        touched = torch.zeros(self.slots.shape[0], dtype=torch.bool, device=tokens.device)
        touched[slot] = True
        updated = self.slots.clone()
        updated[touched] = self.momentum * self.slots[touched] + (1 - self.momentum) * agg[touched]
        self.slots = F.normalize(updated, dim=-1)


class TextRefiner(nn.Module):
    """TRM: t' = t + alpha * W [t ; read(t)], W: 2d -> d without bias."""

    def __init__(self, dim: int, alpha: float):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim, bias=False)
        self.alpha = alpha

    def forward(self, text: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        return text + self.alpha * self.proj(torch.cat([text, read], dim=-1))


class ImageRefiner(nn.Module):
    """IRM: multi-head attention from image queries to memory entries.

    Memory shared by the batch (M, d) has its keys and values projected once per forward, not once
    per image: the same computation as ``nn.MultiheadAttention`` on the memory expanded over the
    batch (which is what :attr:`attn` holds the weights of, so checkpoints are unchanged), without
    the B-fold projection of identical keys (at C = 1000 classes, m = 4 that was ~34 GMAC per batch
    of 16 images).
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"TRAINER.SPOTLIGHTER.IRM.HEADS = {heads} must divide the embedding width {dim}")
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def memory_kv(self, memory: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a memory shared by the batch (M, d): two (H, M, head dim) tensors."""
        a = self.attn
        E, H = a.embed_dim, a.num_heads
        w_kv, b_kv = a.in_proj_weight[E:], a.in_proj_bias[E:]
        k, v = F.linear(memory, w_kv, b_kv).view(memory.shape[0], 2, H, E // H).permute(1, 2, 0, 3)
        return k, v

    def forward(self, queries: torch.Tensor, memory: torch.Tensor,
                kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """queries (B, q, d); memory (M, d) shared by the batch or (B, M, d). ``kv``: the shared
        memory's :meth:`memory_kv`, when the caller already has them (evaluation caches them)."""
        if memory.dim() == 3:
            return self.attn(queries, memory, memory, need_weights=False)[0]
        a = self.attn
        B, L, E = queries.shape
        H = a.num_heads
        q = F.linear(queries, a.in_proj_weight[:E], a.in_proj_bias[:E]).view(B, L, H, E // H).transpose(1, 2)
        k, v = self.memory_kv(memory) if kv is None else kv  # (H, M, hd) each
        dropout = a.dropout if self.training else 0.0
        if dropout:  # dropout draws one mask per image: the batch stays a batch dimension
            out = F.scaled_dot_product_attention(q, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1),
                                                 dropout_p=dropout)
        else:  # every query attends to the same keys on its own: the batch's B*L queries as one sequence
            qf = q.transpose(0, 1).reshape(1, H, B * L, E // H)
            out = F.scaled_dot_product_attention(qf, k.unsqueeze(0), v.unsqueeze(0))
            out = out.view(H, B, L, E // H).transpose(0, 1)
        return a.out_proj(out.transpose(1, 2).reshape(B, L, E))


# --------------------------------------------------------------------------- the head
@dataclass
class HeadConfig:
    """Flat view of ``cfg.TRAINER.SPOTLIGHTER`` used by :class:`SpotlighterHead`; built by :meth:`from_cfg`
    (every default lives in spotlighter/config.py)."""

    top_k: int
    level_sizes: Tuple[int, int]
    score: ScoreWeights
    mapper_hidden: int
    mapper_at_test: bool
    memory_kind: str
    prototypes_per_class: int
    shared_slots: int
    momentum: float
    read_temperature: float
    memory_write: str
    memory_seed: int
    alpha: float
    irm_kind: str
    irm_heads: int
    irm_dropout: float
    beta_train: float
    beta_test: float
    normalize_fused: bool
    dynamic_level_weights: bool
    local_weight: float
    consistency_weight: float
    local_text: str
    local_logits: str
    test_local_gamma: float

    @classmethod
    def from_cfg(cls, node) -> "HeadConfig":
        return cls(
            top_k=node.TOP_K, level_sizes=tuple(node.LEVEL_SIZES),
            score=ScoreWeights(node.SCORE.SAMPLE_WEIGHT, node.SCORE.SEMANTIC_WEIGHT, node.SCORE.ATTN_WEIGHT,
                               node.SCORE.EPS),
            mapper_hidden=node.MAPPER.HIDDEN, mapper_at_test=node.MAPPER.AT_TEST,
            memory_kind=node.MEMORY.KIND, prototypes_per_class=node.MEMORY.PROTOTYPES_PER_CLASS,
            shared_slots=node.MEMORY.SHARED_SLOTS, momentum=node.MEMORY.MOMENTUM,
            read_temperature=node.MEMORY.READ_TEMPERATURE, memory_write=node.MEMORY.WRITE,
            memory_seed=node.MEMORY.INIT_SEED, alpha=node.TRM.ALPHA, irm_kind=node.IRM.KIND,
            irm_heads=node.IRM.HEADS, irm_dropout=node.IRM.DROPOUT, beta_train=node.FUSION.BETA_TRAIN,
            beta_test=node.FUSION.BETA_TEST, normalize_fused=node.FUSION.NORMALIZE,
            dynamic_level_weights=node.LOSS.LEVEL_WEIGHTS == "dynamic",
            local_weight=node.LOSS.LOCAL_WEIGHT, consistency_weight=node.LOSS.CONSISTENCY_WEIGHT,
            local_text=node.LOSS.LOCAL_TEXT, local_logits=node.LOSS.LOCAL_LOGITS,
            test_local_gamma=node.TEST.LOCAL_GAMMA,
        )

    @classmethod
    def default(cls, preset: str = "paper") -> "HeadConfig":
        """The defaults of ``preset`` (spotlighter/config.py)."""
        from .config import apply_preset, default_cfg

        cfg = default_cfg()
        apply_preset(cfg, preset)
        return cls.from_cfg(cfg.TRAINER.SPOTLIGHTER)


@dataclass
class HeadOutput:
    logits: torch.Tensor  # (B, C)
    losses: Dict[str, torch.Tensor]  # named loss terms (already weighted); empty at test
    token_idx: torch.Tensor  # (B, k) selected token indices (into the image tokens), ranked
    top_scores: torch.Tensor  # (B, k)
    scores: Optional[torch.Tensor] = None  # (B, P') every remaining patch's score
    patch_idx: Optional[torch.Tensor] = None  # (B, k) original patch index (row-major grid) of token_idx
    #: training only, detached scalars: ``sel_score`` the mean score of the selected tokens (scores are
    #: standardised per image: how far they stand out), ``sel_level1_weight`` Level-1's mean weight in the
    #: local loss (1/3 each when LOSS.LEVEL_WEIGHTS is fixed: Level-1, Level-2 and all)
    stats: Optional[Dict[str, torch.Tensor]] = None


@dataclass
class ClassSide:
    """The image-independent part of a head forward (see :meth:`SpotlighterHead.class_side`)."""

    text: torch.Tensor  # (C, d) unit-norm class text
    refined: torch.Tensor  # (C, d) TRM's refined text
    memory_kv: Optional[Tuple[torch.Tensor, torch.Tensor]]  # IRM keys/values of the memory, (H, M, hd)


def _same_key(a: tuple, b: tuple) -> bool:
    """Cache keys of :meth:`SpotlighterHead.class_side`: tensors compared by identity, the rest by value."""
    text_a, ver_a, bufs_a, *rest_a = a
    text_b, ver_b, bufs_b, *rest_b = b
    return (text_a is text_b and ver_a == ver_b and len(bufs_a) == len(bufs_b)
            and all(x is y for x, y in zip(bufs_a, bufs_b)) and rest_a == rest_b)


class SpotlighterHead(nn.Module):
    """Everything Spotlighter adds on top of a prompt learner and the frozen CLIP."""

    def __init__(self, cfg: HeadConfig, dim: int, classnames: Sequence[str],
                 class_text: Optional[torch.Tensor] = None):
        """``class_text`` (C, d): the prototypes' initialisation, needed by the class memory only."""
        super().__init__()
        self.cfg = cfg
        self.mapper = TokenMapper(dim, cfg.mapper_hidden)
        if cfg.memory_kind == "class":
            if class_text is None:
                raise ValueError("the class memory is initialised from class text embeddings")
            self.memory: nn.Module = ClassMemory(class_text, classnames, cfg.prototypes_per_class,
                                                 cfg.momentum, cfg.read_temperature)
        else:
            self.memory = SharedMemory(cfg.shared_slots, dim, cfg.momentum, cfg.read_temperature,
                                       cfg.memory_seed)
        self.trm = TextRefiner(dim, cfg.alpha)
        self.irm = ImageRefiner(dim, cfg.irm_heads, cfg.irm_dropout)

    def forward(self, img: ImageTokens, text: torch.Tensor, logit_scale: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> HeadOutput:
        cfg = self.cfg
        training = self.training and labels is not None
        s = logit_scale.exp().float()
        v_hat = F.normalize(img.global_feat.float(), dim=-1)
        tokens = img.tokens.float()
        cs = self.class_side(text)
        t_hat, t_ref = cs.text, cs.refined
        protos = self.memory.prototypes if isinstance(self.memory, ClassMemory) else None

        with torch.no_grad():
            probs = (s * v_hat @ t_hat.t()).softmax(dim=-1)
            patches = F.normalize(tokens[:, 1:], dim=-1)
            scores = token_scores(patches, probs, t_hat, protos, img.cls_attn, cfg.score)
            top_scores, token_idx = select_top_k(scores, cfg.top_k)

        if not (training or cfg.mapper_at_test):
            mapped = tokens
            selected = gather_tokens(tokens, token_idx)  # (B, k, d)
        elif training or self.mapper.training:  # BatchNorm on batch statistics: every token takes part
            mapped = self.mapper(tokens)
            selected = gather_tokens(mapped, token_idx)
        else:  # BatchNorm on running statistics acts token by token: map the selected ones only
            mapped = None
            selected = self.mapper(gather_tokens(tokens, token_idx))

        if cfg.irm_kind == "tokens":
            rep = selected + self.irm(selected, self.memory.keys(), kv=cs.memory_kv)
            o = (top_scores.softmax(dim=1).unsqueeze(-1) * rep).sum(dim=1)
        else:
            read_v = self.memory.read(v_hat)
            o = self.irm(v_hat.unsqueeze(1), read_v.unsqueeze(1)).squeeze(1)
            rep = selected
        beta = cfg.beta_train if training else cfg.beta_test
        v_fused = (1 - beta) * v_hat + beta * (F.normalize(o, dim=-1) if cfg.normalize_fused else o)
        logits = s * v_fused @ t_ref.t()
        local_text = F.normalize(t_ref, dim=-1) if cfg.local_text == "refined" else t_hat

        losses: Dict[str, torch.Tensor] = {}
        stats: Dict[str, torch.Tensor] = {}
        if training:
            losses["global"] = F.cross_entropy(logits, labels)
            losses["local"] = cfg.local_weight * self._local_loss(mapped, rep, top_scores, local_text, s, labels)
            losses["consistency"] = cfg.consistency_weight * (
                F.l1_loss(F.normalize(t_ref, dim=-1), t_hat) + F.l1_loss(F.normalize(o, dim=-1), v_hat))
            self._write_memory(patches, mapped, token_idx, top_scores, labels)
            with torch.no_grad():
                w = level_weights(top_scores, cfg.level_sizes, cfg.dynamic_level_weights, include_all=True)
                stats = {"sel_score": top_scores.mean(), "sel_level1_weight": (w[:, 0] / w.sum(dim=1)).mean()}
        elif cfg.test_local_gamma > 0:
            levels = split_levels(rep, cfg.level_sizes)
            w = level_weights(top_scores, cfg.level_sizes, cfg.dynamic_level_weights, include_all=False)
            w = w / w.sum(dim=1, keepdim=True)
            local = sum(w[:, i:i + 1] * self._local_logits(lv, local_text, s).mean(dim=1)
                        for i, lv in enumerate(levels))
            logits = logits + cfg.test_local_gamma * local
        patch_idx = token_idx - 1 if img.patch_index is None else img.patch_index.gather(1, token_idx - 1)
        return HeadOutput(logits=logits, losses=losses, token_idx=token_idx, top_scores=top_scores,
                          scores=scores, patch_idx=patch_idx, stats=stats)

    def class_side(self, text: torch.Tensor) -> "ClassSide":
        """What depends on the class text and the memory only, not on the images: the unit-norm
        text, TRM's refined text and (IRM over tokens) the memory's keys and values.

        Without gradients it is computed once and reused while the same ``text`` tensor (CoOp's
        cached text features at evaluation), the same memory buffers and unchanged TRM/IRM
        parameters come in (an optimizer step, a checkpoint load, a memory write or ``.to()``
        each change one of them), as the prompt learner's text features are."""
        if torch.is_grad_enabled():
            return self._class_side(text)
        params = tuple((p.data_ptr(), p._version) for m in (self.trm, self.irm) for p in m.parameters())
        buffers = tuple(self.memory.buffers())
        key = (text, text._version, buffers, tuple(b._version for b in buffers), params)
        cached = getattr(self, "_class_side_cache", None)
        if cached is None or not _same_key(cached[0], key):
            self._class_side_cache = (key, self._class_side(text))  # holds the tensors: no id reuse
        return self._class_side_cache[1]

    def _class_side(self, text: torch.Tensor) -> "ClassSide":
        t_hat = F.normalize(text.float(), dim=-1)
        refined = self.trm(t_hat, self.memory.read_own(t_hat))
        kv = self.irm.memory_kv(self.memory.keys()) if self.cfg.irm_kind == "tokens" else None
        return ClassSide(text=t_hat, refined=refined, memory_kv=kv)

    def _local_logits(self, tokens: torch.Tensor, text: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """(B, n, d) tokens -> (B, n, C): ``s·cos(u, t)`` (cosine) or ``s·u·tᵀ`` (dot, as released:
        the tokens stay unnormalised; ``text`` is already unit-norm)."""
        if self.cfg.local_logits == "cosine":
            tokens = F.normalize(tokens, dim=-1)
        return s * tokens @ text.t()

    def _local_loss(self, mapped, rep, top_scores, text, s, labels) -> torch.Tensor:
        """CE of every token of each set (Level-1, Level-2, all), each set with CLS and mean token."""
        cfg = self.cfg
        extra = torch.stack([mapped[:, 0], mapped.mean(dim=1)], dim=1)  # (B, 2, d)
        sets = split_levels(rep, cfg.level_sizes) + [rep]
        w = level_weights(top_scores, cfg.level_sizes, cfg.dynamic_level_weights, include_all=True)
        total = rep.new_zeros(())
        for i, members in enumerate(sets):
            x = torch.cat([extra[:, :1], members, extra[:, 1:]], dim=1)
            logits = self._local_logits(x, text, s)  # (B, n, C)
            ce = F.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(x.shape[1]),
                                 reduction="none").view(x.shape[0], -1).mean(dim=1)
            total = total + (w[:, i] * ce).mean()
        return total

    @torch.no_grad()
    def _write_memory(self, patches, mapped, token_idx, top_scores, labels) -> None:
        if self.cfg.memory_write == "selected":
            raw = gather_tokens(patches, token_idx - 1)  # unit-norm projected tokens of the patches
            self.memory.write(raw.flatten(0, 1), labels.repeat_interleave(raw.shape[1]),
                              top_scores.flatten())
        else:  # every mapped token, equally weighted within its prototype/slot
            n = mapped.shape[1]
            self.memory.write(mapped.detach().flatten(0, 1), labels.repeat_interleave(n),
                              mapped.new_zeros(mapped.shape[0] * n))
