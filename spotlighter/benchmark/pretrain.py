"""A small CLIP (``clip.model.CLIP``, ViT-8 at 64 px) pretrained contrastively on MiniBench's renders.

The model is the real OpenAI CLIP architecture at a tiny size, so every trainer that accepts
CLIP weights accepts it: :func:`ensure_clip` saves ``model.state_dict()`` (float32 tensors only)
and ``clip.model.build_model(torch.load(path, weights_only=True))`` or
``clip.load(path, jit=False)`` rebuild it.

Pretraining draws image-caption pairs on the fly from the generators over *every* concept of every
vocabulary (MiniBench's 24 classes and the glyphs, textures and objects of its cross-dataset
targets: real CLIP has seen every concept; ``scene_share`` of the stream is MiniBench scenes) using
the seed domain ``DOMAIN_PRETRAIN``, disjoint from the benchmarks' own images, with varied
caption templates including MiniBench's attribute-only phrases ("a photo of something red."). The
other vocabularies are rendered cleaner than their benchmarks (``recipe.DEFAULT_CLIP_PARAMS["render"]``);
MiniBench's scenes come in two caption domains (``benchmark_like_share``, ``cross_domain_captions``):
rendered like the benchmark with scene captions, or clean with photo captions, never mixed, so the
zero-shot prompt "a photo of a {}." is from the other domain on the benchmark (DATASETS.md, "The
small CLIP"). Because many captions in a batch describe the same concept, the
CLIP loss is used in its multi-positive form (UniCL-style): the target distribution of an image
is uniform over every caption in the batch that correctly describes it, and vice versa. With one
caption per concept this reduces to the standard symmetric CLIP loss. The learnable temperature
is initialised at ``log(1 / 0.07)`` and clamped at 100 as in CLIP.
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import machine
from ..fileio import atomic_path
from . import data, reference
from .paths import read_sidecar, sidecar_path
from .recipe import PRETRAIN_VERSION, build_clip, normalise_params

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ZEROSHOT_TEMPLATE = "a photo of a {}."


# --------------------------------------------------------------------------- model


def load_clip(path: str) -> "torch.nn.Module":
    """Load the saved model through the trainers' loader (exact float32 weights, eval mode)."""
    from ..backbone import load_clip as load_backbone

    return load_backbone("MiniBench-ViT", path=path)


def to_tensor(images: Sequence, dtype=torch.float32) -> torch.Tensor:
    """PIL images / uint8 HWC arrays -> CLIP-normalised NCHW tensor."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    x = torch.from_numpy(arr).to(dtype).div_(255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=dtype).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- data stream


class _CaptionBank:
    """Every pretraining caption of every vocabulary, tokenised once, and which concept each fits.

    Concepts are ``(vocabulary, label)`` pairs in ``data.VOCABULARIES`` order; ``positive[c, u]``
    says caption ``u`` correctly describes an image of concept ``c`` (MiniBench's colour-only and
    shape-only captions fit several concepts).
    """

    def __init__(self, context_length: int):
        import clip

        scene_texts, scene_cons, scene_domains = data.caption_bank()
        self.texts: List[str] = list(scene_texts)
        self.concepts: List[tuple] = [("scenes", l) for l in range(data.NUM_CLASSES)]
        cons = [("scenes", c) for c in scene_cons]
        for key, vocab in data.VOCABULARIES.items():
            if key == "scenes":
                continue
            for label, name in enumerate(vocab.classnames):
                self.concepts.append((key, label))
                for t in vocab.templates:
                    self.texts.append(t.format(name))
                    cons.append((key, label))
        self.concept_index = {c: i for i, c in enumerate(self.concepts)}
        self.index = {t: i for i, t in enumerate(self.texts)}
        if len(self.index) != len(self.texts):
            raise ValueError("pretraining captions must be unique across vocabularies")
        self.templates = {k: v.templates for k, v in data.VOCABULARIES.items()}
        tokens = clip.tokenize(self.texts, context_length=context_length)
        eot = tokens.argmax(dim=-1)
        # Causal attention: positions after EOT never influence the EOT feature, so training on
        # the first (max EOT + 1) positions is exact and much cheaper than all 77.
        self.train_len = int(eot.max()) + 1
        self.tokens = tokens[:, : self.train_len].contiguous()
        pos = torch.zeros(len(self.concepts), len(self.texts), dtype=torch.bool)
        for c, (key, label) in enumerate(self.concepts):
            for u, (ckey, con) in enumerate(cons):
                if ckey != key:
                    continue
                if key == "scenes":
                    colour, shape = data.CLASS_ATTRIBUTES[label]
                    cc, cs = con
                    pos[c, u] = (cc is None or cc == colour) and (cs is None or cs == shape)
                else:
                    pos[c, u] = con == label
        self.positive = pos
        # Domain of every caption: 0 for the other vocabularies, 1 + its index in data.CAPTION_DOMAINS
        # for MiniBench's (image domains use the same codes).
        self.domain = torch.tensor([1 + data.CAPTION_DOMAINS.index(d) for d in scene_domains]
                                   + [0] * (len(self.texts) - len(scene_texts)))

    def caption(self, concept: int, rng: np.random.Generator, attribute_only_prob: float,
                domain: Optional[str] = None) -> int:
        key, label = self.concepts[concept]
        if key == "scenes":
            return self.index[data.caption(label, rng, attribute_only_prob, domain)]
        t = self.templates[key][rng.integers(len(self.templates[key]))]
        return self.index[t.format(data.VOCABULARIES[key].classnames[label])]


def sample_concepts(rng: np.random.Generator, n: int, params: dict, bank: _CaptionBank) -> np.ndarray:
    """``n`` concept ids: MiniBench scenes with probability ``scene_share``, else any other concept."""
    n_scene = data.NUM_CLASSES
    n_other = len(bank.concepts) - n_scene
    scene = rng.random(n) < float(params["scene_share"])
    return np.where(scene, rng.integers(n_scene, size=n), n_scene + rng.integers(max(1, n_other), size=n))


def sample_batch(step: int, batch_size: int, params: dict, bank: _CaptionBank):
    """Deterministic batch ``step`` of the pretraining stream: (images, concept ids, caption ids,
    image domains: 0 other vocabularies, else the code of the scene's caption domain, see
    ``_CaptionBank.domain``; with ``benchmark_like_share`` None every scene is 0)."""
    rng = data.image_rng(params["seed"], data.DOMAIN_PRETRAIN, step)
    concepts = sample_concepts(rng, batch_size, params, bank)
    share = params["benchmark_like_share"]
    images, caps, domains = [], [], []
    for c in concepts:
        key, label = bank.concepts[int(c)]
        render, domain = params["render"][key], None
        if key == "scenes" and share is not None:
            domain = "scene" if rng.random() < float(share) else "photo"
            if domain == "scene":  # the clean-photo overrides undone: rendered as the benchmark is
                render = {**render, **{k: data.SCENE_RENDER[k] for k in data.VOCABULARIES[key].pretrain_render}}
        images.append(data.VOCABULARIES[key].render(label, rng, render))
        caps.append(bank.caption(int(c), rng, params["attribute_only_prob"], domain))
        domains.append(0 if domain is None else 1 + data.CAPTION_DOMAINS.index(domain))
    return to_tensor(images), torch.as_tensor(concepts), torch.as_tensor(caps), torch.as_tensor(domains)


def contrastive_loss(model, images, labels, caption_ids, bank: _CaptionBank,
                     image_domains: Optional[torch.Tensor] = None, cross_domain: str = "positive") -> torch.Tensor:
    """Symmetric multi-positive CLIP loss over the batch's images and its distinct captions.

    ``image_domains`` (B,) with ``cross_domain`` "negative" or "ignore": a MiniBench caption of one
    domain is not a positive for a scene of the other domain; "ignore" also leaves the pair out of
    both softmaxes (its logit is -inf)."""
    uniq = torch.unique(caption_ids)
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(bank.tokens[uniq]), dim=-1)
    scale = model.logit_scale.exp()
    logits = scale * img @ txt.t()  # [B, U]
    pos = bank.positive[labels][:, uniq]  # [B, U]
    clash = None
    if image_domains is not None and cross_domain != "positive":
        cap = bank.domain[uniq][None, :]
        img_dom = image_domains[:, None]
        clash = (img_dom > 0) & (cap > 0) & (img_dom != cap)
        pos = pos & ~clash
        if cross_domain == "ignore":
            logits = logits.masked_fill(clash, float("-inf"))
    pos = pos.float()
    t_i2t = pos / pos.sum(1, keepdim=True)
    t_t2i = pos / pos.sum(0, keepdim=True)
    lp_i2t, lp_t2i = logits.log_softmax(dim=1), logits.log_softmax(dim=0)
    if clash is not None and cross_domain == "ignore":  # 0 * -inf would be nan
        lp_i2t, lp_t2i = lp_i2t.masked_fill(clash, 0.0), lp_t2i.masked_fill(clash, 0.0)
    loss_i2t = -(t_i2t * lp_i2t).sum(1).mean()
    loss_t2i = -(t_t2i * lp_t2i).sum(0).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim >= 2 and "embedding" not in name and name not in ("text_projection", "visual.proj"):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain(params: Optional[dict] = None, *, log_every: int = 10) -> "torch.nn.Module":
    """Train the small CLIP from scratch with a fixed seed; return it in eval mode (float32)."""
    p = normalise_params(params or {})
    torch.manual_seed(p["seed"])
    model = build_clip(p)
    model.train()
    bank = _CaptionBank(p["context_length"])
    opt = torch.optim.AdamW(_param_groups(model, p["weight_decay"]), lr=p["lr"], betas=(0.9, 0.98), eps=1e-6)
    steps, warm = int(p["steps"]), int(p["warmup_steps"])

    def lr_at(s: int) -> float:
        if s < warm:
            return p["lr"] * (s + 1) / warm
        return 0.5 * p["lr"] * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    logger.info(
        "Pretraining MiniBench CLIP: %d steps x batch %d, %d torch threads, text trained on %d positions",
        steps, p["batch_size"], torch.get_num_threads(), bank.train_len,
    )
    t0, c0 = time.time(), time.process_time()
    running = None
    # Render batch s+1 in a helper thread while batch s trains (torch releases the GIL); each
    # batch depends only on (seed, step), so this changes no number.
    pool = ThreadPoolExecutor(max_workers=1)
    pending = pool.submit(sample_batch, 0, p["batch_size"], p, bank)
    for step in range(steps):
        images, labels, caps, domains = pending.result()
        if step + 1 < steps:
            pending = pool.submit(sample_batch, step + 1, p["batch_size"], p, bank)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = contrastive_loss(model, images, labels, caps, bank, domains, p["cross_domain_captions"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            el = time.time() - t0
            eta = el / (step + 1) * (steps - step - 1)
            logger.info(
                "step %d/%d loss %.4f (avg %.4f) logit_scale %.1f lr %.2e elapsed %.0fs (cpu %.0fs) ETA %.0fs",
                step + 1, steps, loss.item(), running, model.logit_scale.exp().item(), lr_at(step), el,
                time.process_time() - c0, eta,
            )
    pool.shutdown()
    return model.eval()


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def encode_images(model, paths: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    from PIL import Image

    feats = []
    for i in range(0, len(paths), batch_size):
        ims = [Image.open(pth).convert("RGB") for pth in paths[i : i + batch_size]]
        feats.append(F.normalize(model.encode_image(to_tensor(ims)).float(), dim=-1))
    return torch.cat(feats)


@torch.no_grad()
def encode_classnames(model, classnames: Sequence[str], template: str = ZEROSHOT_TEMPLATE) -> torch.Tensor:
    import clip

    tokens = clip.tokenize([template.format(c) for c in classnames], context_length=model.context_length)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


@torch.no_grad()
def zeroshot_accuracy(model, dataset_dir: str, split: str = "test", template: str = ZEROSHOT_TEMPLATE) -> dict:
    """Zero-shot accuracy (%) with ``template`` on a generated dataset, plus the chance levels.

    MiniBench (the source): base among base classes, new among new classes, all among all classes
    (the base-to-novel protocol). Other generated datasets: ``all`` only.
    """
    meta = data.read_meta(dataset_dir) or {}
    key = meta.get("key", "minibench")
    classnames = meta.get("classnames") or list(data.get_spec(key).classnames)
    items = data.read_split(dataset_dir, key)[split]
    paths = [it[0] for it in items]
    labels = torch.tensor([it[1] for it in items])
    img = encode_images(model, paths)
    txt = encode_classnames(model, classnames, template)
    sims = img @ txt.t()
    n = len(classnames)
    halves = [("all", tuple(range(n)))]
    if data.get_spec(key).role == "source":
        nb = math.ceil(n / 2)
        halves = [("base", tuple(range(nb))), ("new", tuple(range(nb, n)))] + halves
    out = {"dataset": key}
    for name, classes in halves:
        cls = torch.tensor(classes)
        mask = torch.isin(labels, cls)
        pred = cls[sims[mask][:, cls].argmax(dim=1)]
        out[name] = round(100.0 * (pred == labels[mask]).float().mean().item(), 2)
        out[f"chance_{name}"] = round(100.0 / len(classes), 2)
    out["split"] = split
    out["template"] = template
    out["num_images"] = int(len(items))
    return out


# --------------------------------------------------------------------------- caching


def ensure_clip(path: str, *, dataset_dir: Optional[str] = None, eval_dirs: Sequence[str] = (),
                use_reference: bool = True, **params) -> dict:
    """Install or pretrain the MiniBench CLIP at ``path`` unless it exists with the same params.

    When the shipped reference CLIP (:mod:`.reference`) was pretrained with exactly these params and
    ``use_reference`` is true, its weights are installed (the same bits on every machine);
    otherwise the CLIP is pretrained here. Writes ``path`` (plain float32 state dict) and then
    ``path + ".json"`` (version, params, origin, digest, training time and, when ``dataset_dir`` is
    given, the zero-shot accuracies on its test split). Returns the sidecar dict. Raises
    ``ValueError`` naming the differing parameters when a cached model was built with other
    parameters. A cached model is kept only when its weights have the digest they must have
    (:func:`.reference.check_clip`: the shipped reference's when its sidecar says it is the reference);
    otherwise it is built again, with a warning.
    """
    p = normalise_params(params)
    meta = read_sidecar(path)
    if meta is not None and (meta.get("pretrain_version") != PRETRAIN_VERSION
                             or (meta.get("params") or {}).get("generator_version") != data.GENERATOR_VERSION):
        logger.warning("MiniBench CLIP at %s is from pretraining recipe %s / generator %s (current: %s / %s); "
                       "rebuilding it", path, meta.get("pretrain_version"),
                       (meta.get("params") or {}).get("generator_version"), PRETRAIN_VERSION, data.GENERATOR_VERSION)
        meta = None
    if meta is not None:
        data.require_same_params(meta, p, "pretrain_version", PRETRAIN_VERSION, f"MiniBench CLIP at {path}",
                                 f"Delete {path!r} and {sidecar_path(path)!r} to rebuild it.")
        try:  # the weights must be the ones the sidecar describes before it is reported as theirs
            reference.check_clip(path)
        except reference.ClipMismatch as e:
            logger.warning("MiniBench CLIP at %s is not the one its sidecar describes: %s; building it again",
                           path, e.problem)
            meta = None
        else:
            logger.info("MiniBench CLIP already present at %s (digest checked); nothing to do", path)
            return meta
    if os.path.exists(sidecar_path(path)):
        os.remove(sidecar_path(path))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ref = reference.matches(p) if use_reference else None
    if ref is not None:
        meta = {"pretrain_version": PRETRAIN_VERSION, "params": p, **reference.install(path, size=ref["size"])}
        logger.info("Installed the reference MiniBench CLIP (pretrained on %s, digest %s) at %s",
                    meta["cpu"], meta["digest"][:16], path)
    else:
        t0, c0 = time.time(), time.process_time()
        model = pretrain(p)
        train_s, cpu_s = time.time() - t0, time.process_time() - c0
        state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        meta = {
            "pretrain_version": PRETRAIN_VERSION,
            "params": p,
            "origin": "pretrained here",
            "digest": reference.state_digest(state),
            "train_seconds": round(train_s, 1),
            "train_cpu_seconds": round(cpu_s, 1),
            "torch_threads": torch.get_num_threads(),
            # the weights depend on the CPU's kernels (and the thread count): a CLIP pretrained on another
            # CPU kind differs, and so do the accuracies measured with it (hence the reference CLIP)
            "cpu": machine.cpu_name(),
            "torch": torch.__version__,
        }
    meta["file_bytes"] = os.path.getsize(path)
    if dataset_dir is not None:
        # as the trainers' loader builds it; checked here against the digest the sidecar (written last) records
        from ..backbone import build_clip as build_backbone

        state = torch.load(path, map_location="cpu", weights_only=True)
        if reference.state_digest(state) != meta["digest"]:
            raise ValueError(f"{path}: the weights just written read back with another digest (a failing disk?)")
        model = build_backbone(state, source=path)
        meta["zeroshot"] = zeroshot_accuracy(model, dataset_dir)
        meta["dataset_dir"] = os.path.abspath(dataset_dir)
        logger.info("Zero-shot accuracy: %s", meta["zeroshot"])
        if eval_dirs:
            meta["zeroshot_targets"] = {}
            for d in eval_dirs:
                z = zeroshot_accuracy(model, d)
                meta["zeroshot_targets"][z["dataset"]] = z
                logger.info("Zero-shot accuracy: %s", z)
    data._write_json_atomic(sidecar_path(path), meta)  # last: marks the cache complete
    return meta
