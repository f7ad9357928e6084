"""Prompt learners (CoOp, CoCoOp, MaPLe) on top of :class:`~spotlighter.backbone.FrozenCLIP`.

Class-dependent tensors (token prefix/suffix, tokenized prompts) are *non-persistent* buffers:
they never enter a checkpoint, so one checkpoint serves base, new, cross-dataset and DG classes.
Learnable tensors are kept in float32 and cast to the backbone's dtype at use.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .backbone import FrozenCLIP
from .config import ConfigError

logger = logging.getLogger(__name__)

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
#: Where a prompt learner's context words come from, until the trainer names its config node.
CTX_KEY = "TRAINER.<trainer>.CTX_INIT"


def _clean(names: Sequence[str]) -> List[str]:
    return [n.replace("_", " ") for n in names]


class PromptTooLong(ConfigError):
    """A prompt has more tokens than the text encoder's context (CLIP would cut it off silently).
    ``str()`` names the context key as ``CTX_KEY``; :meth:`for_node` names the trainer's node."""

    def for_node(self, node: str) -> "PromptTooLong":
        return PromptTooLong(str(self).replace(CTX_KEY, f"{node}.CTX_INIT"))


def token_count(text: str, clip: Optional[FrozenCLIP] = None) -> int:
    """Tokens of ``text`` as CLIP's tokenizer (``clip``'s, when given) makes them, start and end
    tokens included."""
    if clip is not None:
        return clip.token_count(text)
    from clip import clip as clip_api

    return len(clip_api._tokenizer.encode(text)) + 2


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_class_prompts(clip: FrozenCLIP, classnames: Sequence[str], texts: Sequence[str], context: str) -> None:
    """Raise :class:`PromptTooLong` naming the first class whose prompt ``texts[i]`` does not fit in
    the context (CLIP's tokenize would truncate it: with a long context every class could get the
    same prompt). ``context``: what else is in the prompt (the key to shorten)."""
    limit = clip.context_length
    for name, text in zip(classnames, texts):
        n = token_count(text, clip)
        if n > limit:
            raise PromptTooLong(
                f"the prompt of class {_short(name)!r} has {n} tokens ({_short(text)!r}), more than the text "
                f"encoder's context of {limit}: CLIP would cut it off. Shorten the class name (in the "
                f"dataset's class names) or {context}."
            )


def init_context(clip: FrozenCLIP, n_ctx: int, ctx_init: str, n_cls: int = 0,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, str]:
    """Context vectors (n_ctx, w) or (n_cls, n_ctx, w) and the text prefix they stand for."""
    width = clip.text_width
    if ctx_init:
        words = ctx_init.replace("_", " ").strip()
        n_words = token_count(words, clip)
        if n_words + 1 > clip.context_length:  # no room left for a class name
            raise PromptTooLong(f"{CTX_KEY} = {_short(words)!r} has {n_words} tokens, which leaves no room for "
                                f"the class name in the text encoder's context of {clip.context_length} tokens: "
                                "use fewer words.")
        n_ctx = len(words.split(" "))
        tokens = clip.tokenize([words]).to(clip.model.positional_embedding.device)
        with torch.no_grad():
            emb = clip.token_embedding(tokens).float()
        ctx = emb[0, 1:1 + n_ctx].clone()
        if n_cls:
            ctx = ctx.unsqueeze(0).repeat(n_cls, 1, 1)
        return ctx.cpu(), words
    shape = (n_cls, n_ctx, width) if n_cls else (n_ctx, width)
    ctx = torch.empty(shape).normal_(0.0, 0.02, generator=generator)
    return ctx, " ".join(["X"] * n_ctx)


class ClassPrompts(nn.Module):
    """Token embeddings of ``"<prefix> <classname>."`` split around the learnable context."""

    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str], prefix_text: str, n_ctx: int):
        super().__init__()
        names = _clean(classnames)
        device = clip.model.positional_embedding.device
        texts = [f"{prefix_text} {n}." for n in names]
        check_class_prompts(clip, classnames, texts, f"use fewer context tokens ({n_ctx} now: {CTX_KEY} or N_CTX)")
        tokenized = clip.tokenize(texts).to(device)
        with torch.no_grad():
            emb = clip.token_embedding(tokenized)
        self.register_buffer("token_prefix", emb[:, :1], persistent=False)  # SOS
        self.register_buffer("token_suffix", emb[:, 1 + n_ctx:], persistent=False)  # class, ., EOS
        self.register_buffer("tokenized_prompts", tokenized, persistent=False)
        self.name_lens = [len(clip.tokenize([n])[0].nonzero()) - 2 for n in names]
        self.n_ctx = n_ctx
        self.n_cls = len(names)

    def assemble(self, ctx: torch.Tensor, position: str = "end") -> torch.Tensor:
        """Prompts (C, L, w) from ctx (n_ctx, w), (C, n_ctx, w); for (B, n_ctx, w) see CoCoOp."""
        prefix, suffix = self.token_prefix, self.token_suffix
        ctx = ctx.to(prefix.dtype)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        if position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        half = self.n_ctx // 2
        out = []
        for i, n in enumerate(self.name_lens):
            name, rest = suffix[i:i + 1, :n], suffix[i:i + 1, n:]
            c = ctx[i:i + 1]
            if position == "middle":
                out.append(torch.cat([prefix[i:i + 1], c[:, :half], name, c[:, half:], rest], dim=1))
            else:  # front
                out.append(torch.cat([prefix[i:i + 1], name, c, rest], dim=1))
        return torch.cat(out, dim=0)


class PromptLearner(nn.Module):
    """CoOp: a few context vectors shared by all classes (or class-specific with ``csc``)."""

    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str], n_ctx: int = 4,
                 ctx_init: str = "a photo of a", csc: bool = False, class_token_position: str = "end"):
        super().__init__()
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(f"class token position {class_token_position!r} not in {CLASS_TOKEN_POSITIONS}")
        if csc and ctx_init:
            # As in CoOp: initialisation words give one context shared by all classes, CSC is ignored
            # (its checkpoints of such runs hold a shared context, and load here).
            logger.warning("CSC = True is ignored because CTX_INIT = %r is set: as in CoOp, the context "
                           "initialised from these words is shared by all classes. For class-specific "
                           "contexts set CTX_INIT \"\" (random init).", ctx_init)
            csc = False
        ctx, prefix = init_context(clip, n_ctx, ctx_init, n_cls=len(classnames) if csc else 0)
        self.ctx = nn.Parameter(ctx)
        self.n_ctx = ctx.shape[-2]
        self.class_token_position = class_token_position
        self.csc = csc
        self.classes = ClassPrompts(clip, classnames, prefix, self.n_ctx)
        if csc and self.ctx.shape[0] != len(classnames):
            raise ValueError("class-specific context needs one context per class")

    @property
    def tokenized_prompts(self) -> torch.Tensor:
        return self.classes.tokenized_prompts

    def forward(self) -> torch.Tensor:
        return self.classes.assemble(self.ctx, self.class_token_position)


class TextEncoder(nn.Module):
    """Encodes prompt embeddings with the frozen CLIP text transformer (no parameters)."""

    def __init__(self, clip: FrozenCLIP):
        super().__init__()
        self._clip = [clip]  # not a submodule: keeps CLIP out of state dicts

    def forward(self, prompts: torch.Tensor, tokenized: torch.Tensor,
                deep_prompts: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        return self._clip[0].encode_text_embeddings(prompts, tokenized, deep_prompts)


class CoCoOpPromptLearner(PromptLearner):
    """CoCoOp: context shifted per image by a meta-net of the image feature."""

    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str], n_ctx: int = 4,
                 ctx_init: str = "a photo of a", reduction: int = 16):
        super().__init__(clip, classnames, n_ctx, ctx_init)
        d, w = clip.embed_dim, clip.text_width
        hidden = max(1, d // reduction)
        self.meta_net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, w))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Prompts (B, C, L, w) for image features (B, d)."""
        bias = self.meta_net(image_features.float()).unsqueeze(1)  # (B, 1, w)
        ctx = self.ctx.unsqueeze(0) + bias  # (B, n_ctx, w)
        return torch.stack([self.classes.assemble(c) for c in ctx])


#: MaPLe initialises its context from CTX_INIT only when N_CTX is at most this (``n_ctx <= 4`` in
#: ``MultiModalPromptLearner``), random otherwise.
MAPLE_MAX_WORD_INIT = 4


def maple_inits_from_words(n_ctx: int, ctx_init: str) -> bool:
    """MaPLe's rule, plus N_CTX <= the words of CTX_INIT: with fewer words MaPLe's own code would use
    the end-of-text token as context and cut the class name out of the prompt; here that is random."""
    words = ctx_init.replace("_", " ").strip().split()
    return bool(words) and n_ctx <= MAPLE_MAX_WORD_INIT and n_ctx <= len(words)


class MaPLePromptLearner(PromptLearner):
    """MaPLe: coupled language->vision prompts in the first ``depth`` layers of both encoders."""

    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str], n_ctx: int = 2,
                 ctx_init: str = "a photo of a", depth: int = 9):
        if depth < 1:
            raise ValueError("MaPLe prompt depth must be >= 1")
        nn.Module.__init__(self)
        # As in MaPLe: the n_ctx learnable tokens replace the first n_ctx words of CTX_INIT, the
        # remaining words stay fixed text ("a photo" learnable + "of a <class>."); with more than
        # MAPLE_MAX_WORD_INIT tokens the context is random ("X X ... <class>.").
        if ctx_init and not maple_inits_from_words(n_ctx, ctx_init):
            logger.info("N_CTX = %d: random context init (MaPLe initialises from CTX_INIT %r only with "
                        "at most %d tokens and at most its words)", n_ctx, ctx_init, MAPLE_MAX_WORD_INIT)
            ctx_init = ""
        ctx, prefix = init_context(clip, n_ctx, ctx_init)
        if ctx_init:
            ctx = ctx[:n_ctx].clone()
        self.ctx = nn.Parameter(ctx)
        self.n_ctx = n_ctx
        self.class_token_position = "end"
        self.csc = False
        self.classes = ClassPrompts(clip, classnames, prefix, n_ctx)
        w, vw = clip.text_width, clip.vision_width
        n = self.n_ctx
        self.proj = nn.Linear(w, vw)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n, w).normal_(0.0, 0.02)) for _ in range(depth - 1)])
        self.compound_prompt_projections = nn.ModuleList([nn.Linear(w, vw) for _ in range(depth - 1)])

    def forward(self):  # type: ignore[override]
        prompts = self.classes.assemble(self.ctx)
        visual = self.proj(self.ctx)
        deep_visual = [layer(p) for layer, p in zip(self.compound_prompt_projections, self.compound_prompts_text)]
        return prompts, list(self.compound_prompts_text), visual, deep_visual


#: IVLP/PromptSRC initialise the text context from CTX_INIT only with at most this many tokens
#: (``n_ctx <= 4`` in their ``VLPromptLearner``), at random otherwise.
IVLP_MAX_WORD_INIT = 4


class VisualPrompts(nn.Module):
    """IVLP's visual prompts: ``n_vision`` tokens (``visual_prompt``) appended after CLS and the patches
    before ``ln_pre``, and ``vision_depth - 1`` deep prompts (``visual_prompts``) that replace them at
    the input of vision blocks 1 .. vision_depth - 1; none with ``vision_depth`` 0. N(0, 0.02^2)."""

    def __init__(self, clip: FrozenCLIP, n_vision: int = 4, vision_depth: int = 9):
        super().__init__()
        self._init_visual(clip, n_vision, vision_depth)

    def _init_visual(self, clip: FrozenCLIP, n_vision: int, vision_depth: int) -> None:
        self.vision_depth = vision_depth
        if vision_depth >= 1:
            vw = clip.vision_width
            self.visual_prompt = nn.Parameter(torch.empty(n_vision, vw).normal_(0.0, 0.02))
            self.visual_prompts = nn.ParameterList(
                [nn.Parameter(torch.empty(n_vision, vw).normal_(0.0, 0.02)) for _ in range(vision_depth - 1)])
        else:
            self.visual_prompt = None
            self.visual_prompts = nn.ParameterList()

    def visual(self):
        """(shallow visual prompt or None, deep visual prompts)."""
        return self.visual_prompt, list(self.visual_prompts)


class IVLPPromptLearner(VisualPrompts):
    """Independent vision-language prompts (IVLP; the prompts PromptSRC trains).

    Text: ``n_text`` context tokens replace the first words of ``"<ctx_init> <class>."`` at the input
    (``ctx``), and ``text_depth - 1`` deep prompts (``text_prompts``) replace those positions at the
    input of text blocks 1 .. text_depth - 1. Vision: :class:`VisualPrompts`. The two branches are
    independent (no coupling function, unlike MaPLe). All prompts are initialised N(0, 0.02^2) except
    a context initialised from words.
    """

    def __init__(self, clip: FrozenCLIP, classnames: Sequence[str], n_text: int = 4, n_vision: int = 4,
                 ctx_init: str = "a photo of a", text_depth: int = 9, vision_depth: int = 9):
        nn.Module.__init__(self)
        words = ctx_init.replace("_", " ").strip().split()
        if words and n_text <= IVLP_MAX_WORD_INIT:
            if n_text > len(words):
                raise ValueError(f"{n_text} context tokens cannot be initialised from the {len(words)} word(s) "
                                 f"{ctx_init!r}: give at least {n_text} words, fewer tokens, or no words "
                                 "(random init)")
            ctx, prefix = init_context(clip, n_text, ctx_init)
            ctx = ctx[:n_text].clone()  # the remaining words stay fixed text, as in IVLP
        else:
            if words:
                logger.info("N_CTX_TEXT = %d: random context init (IVLP initialises from CTX_INIT %r only "
                            "with at most %d tokens)", n_text, ctx_init, IVLP_MAX_WORD_INIT)
            ctx, prefix = init_context(clip, n_text, "")
        self.ctx = nn.Parameter(ctx)
        self.n_ctx = n_text
        self.classes = ClassPrompts(clip, classnames, prefix, n_text)
        w = clip.text_width
        self.text_prompts = nn.ParameterList(
            [nn.Parameter(torch.empty(n_text, w).normal_(0.0, 0.02)) for _ in range(text_depth - 1)])
        self._init_visual(clip, n_vision, vision_depth)

    @property
    def tokenized_prompts(self) -> torch.Tensor:
        return self.classes.tokenized_prompts

    def forward(self):
        """(class prompts (C, L, w), deep text prompts, shallow visual prompt or None, deep visual prompts)."""
        return (self.classes.assemble(self.ctx), list(self.text_prompts), self.visual_prompt,
                list(self.visual_prompts))
