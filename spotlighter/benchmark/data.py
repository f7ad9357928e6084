"""MiniBench: procedurally generated, seeded benchmarks for all three protocols, on a CPU.

Seven generated datasets share one renderer and one small CLIP (see
:mod:`spotlighter.benchmark.pretrain`, pretrained on renders of *every* vocabulary below, with domain-tagged captions):

=====================  ====================  ======  ===============================================
key                    Dassl name            role    content
=====================  ====================  ======  ===============================================
``minibench``          MiniBench             source  24 ``<colour> <shape>`` classes (6 shapes x 4
                                                     colours) in cluttered, noisy 64 px images
``minibench_glyphs``   MiniBenchGlyphs       xd      12 letters (``letter A`` ...)
``minibench_textures`` MiniBenchTextures     xd      10 patterns (``stripes``, ``checkerboard`` ...)
``minibench_objects``  MiniBenchObjects      xd      10 drawn objects (``house``, ``fish`` ...)
``minibench_sketch``   MiniBenchSketch       dg      MiniBench's classes as outlines on paper
``minibench_noise``    MiniBenchNoise        dg      MiniBench's classes under heavy noise and blur
``minibench_palette``  MiniBenchPalette      dg      MiniBench's classes on vivid, high-contrast
                                                     backgrounds
=====================  ====================  ======  ===============================================

MiniBench's base and new classes differ in *what they are*: the base half holds three shapes
(circle, square, triangle) in all four colours, the new half the other three shapes (diamond,
cross, star), so new classes bring new words, not only new combinations of base words. Each image
shows one *target* object of its class (always the biggest) among smaller distractors of other
classes on a textured background, so the global image feature is polluted and *where* the target
sits matters -- the situation patch-token selection is meant for.

The on-disk layout follows CoOp's split format::

    dataset_dir/
        images/<class_folder>/<split>_<index>.png
        split_zhou_<Name>.json   {"train": [[relpath, label, classname], ...], "val": ..., "test": ...}
        meta.json                generator version + parameters (written last: its presence marks a
                                 complete generation)

All randomness comes from :class:`numpy.random.SeedSequence` keys ``(seed, domain, ...)``: every
dataset has its own domain and the CLIP pretraining stream ``DOMAIN_PRETRAIN``, so pretraining
never renders a benchmark image. A change to anything that alters the bytes written must bump
``GENERATOR_VERSION``: cached datasets (and the CLIP pretrained on the renders) of another version
are regenerated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from filelock import FileLock, Timeout
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..fileio import atomic_path

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2
SPLIT_FILENAME = "split_zhou_MiniBench.json"
META_FILENAME = "meta.json"
#: Held (an OS file lock inside the dataset folder) while a dataset is checked or generated: a
#: second process waits, then finds it complete.
LOCK_FILENAME = ".generate.lock"
IMAGE_DIRNAME = "images"

# Seed-stream domains (first-level keys after the user seed). Never reuse a value.
DOMAIN_BENCHMARK = 0
DOMAIN_PRETRAIN = 1
DOMAIN_PRETRAIN_EVAL = 2
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
BASE_SHAPES: Tuple[str, ...] = SHAPES[:3]
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 40, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 35),
}
COLOUR_NAMES: Tuple[str, ...] = tuple(COLOURS)
# Extra colours used only by distractors/clutter (never a class colour).
EXTRA_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "purple": (140, 60, 170),
    "orange": (240, 130, 30),
    "white": (235, 235, 235),
    "cyan": (40, 190, 200),
}
ALL_COLOURS: Tuple[Tuple[str, Tuple[int, int, int]], ...] = tuple(COLOURS.items()) + tuple(EXTRA_COLOURS.items())

# Rendering of MiniBench's scenes (the source benchmark); the DG targets and the pretraining stream
# override some of these keys.
SCENE_RENDER: Dict[str, object] = {
    "image_size": 64,
    "target_size": [20, 30],  # bounding-box side in pixels, inclusive range
    "distractor_size": [9, 16],
    "num_distractors": [3, 6],
    "num_clutter": [4, 10],  # tiny strokes / dots
    "noise_std": 20.0,
    "background": "muted",  # muted | vivid | paper
    "style": "fill",  # fill | outline
    "outline_width": 2,
    "blur": 0.0,  # Gaussian blur radius (px) applied before the noise
    "colour_jitter": 22.0,
}

DEFAULT_PARAMS: Dict[str, object] = {
    "seed": 0,
    "train_per_class": 32,
    "val_per_class": 8,
    "test_per_class": 210,
    "format": "png",
    **SCENE_RENDER,
}
RENDER_KEYS = tuple(SCENE_RENDER)


# --------------------------------------------------------------------------- MiniBench classes


def _class_pairs() -> List[Tuple[str, str]]:
    """All (colour, shape) classes, base half (the ``BASE_SHAPES`` in every colour) first."""
    base = [(c, s) for s in SHAPES if s in BASE_SHAPES for c in COLOUR_NAMES]
    new = [(c, s) for s in SHAPES if s not in BASE_SHAPES for c in COLOUR_NAMES]
    return base + new


CLASS_ATTRIBUTES: Tuple[Tuple[str, str], ...] = tuple(_class_pairs())  # (colour, shape) per label
CLASSNAMES: Tuple[str, ...] = tuple(f"{c} {s}" for c, s in CLASS_ATTRIBUTES)
NUM_CLASSES = len(CLASSNAMES)
NUM_BASE = math.ceil(NUM_CLASSES / 2)
BASE_CLASSES: Tuple[int, ...] = tuple(range(NUM_BASE))
NEW_CLASSES: Tuple[int, ...] = tuple(range(NUM_BASE, NUM_CLASSES))


def class_folder(label: int, classnames: Sequence[str] = CLASSNAMES) -> str:
    return classnames[label].replace(" ", "_")


def attributes() -> Dict[str, Tuple[str, ...]]:
    """Attribute name -> values, e.g. ``{"shape": (...), "colour": (...)}``."""
    return {"shape": SHAPES, "colour": COLOUR_NAMES}


# --------------------------------------------------------------------------- captions

# MiniBench's pretraining captions come in two families (domains), as web captions of different
# kinds of images do: "photo" captions, used for clean renders, and "scene" captions (none of them
# says "photo"), used for renders like the benchmark's cluttered scenes (see the pretraining
# recipe's ``benchmark_like_share``). The zero-shot and CoOp prompt "a photo of a {}." is a photo
# caption, so on the benchmark it is a prompt from the other domain, as real prompts often are.
PHOTO_CAPTION_TEMPLATES: Tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a {}.",
    "a picture of a {}.",
    "a low resolution photo of a {}.",
    "a drawing of a {}.",
)
SCENE_CAPTION_TEMPLATES: Tuple[str, ...] = (
    "a {} among clutter.",
    "a big {} among small shapes.",
    "a large {} and some small distractors.",
    "a cluttered image with a {}.",
    "the biggest object is a {}.",
    "an image showing a {} on a noisy background.",
    "a blurry and noisy low resolution picture of one large {} surrounded by several small objects.",
    "this is a synthetic image made of many small random shapes and one large {} in it.",
    # long captions exercise text positions ~20-32, where prompt learners (e.g. CoOp with 16
    # context tokens) put the class name
    "a synthetic low resolution picture with a noisy textured background, many small coloured "
    "shapes and thin strokes as distractors, and one large {} in it.",
)
CAPTION_TEMPLATES: Tuple[str, ...] = PHOTO_CAPTION_TEMPLATES + SCENE_CAPTION_TEMPLATES
# Captions of the other vocabularies (glyphs, textures, objects).
GENERIC_TEMPLATES: Tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "a low resolution photo of a {}.",
    "an image showing a {}.",
    "a synthetic picture of a {} on a noisy background.",
)
# Captions naming one attribute only, per domain.
COLOUR_ONLY_TEMPLATES: Dict[str, Tuple[str, ...]] = {
    "photo": ("a photo of something {}.",),
    "scene": ("a big {} object.", "the largest object is {}."),
}
SHAPE_ONLY_TEMPLATES: Dict[str, Tuple[str, ...]] = {
    "photo": ("a photo of a {}.",),
    "scene": ("a big {} shape.", "the largest object is a {}."),
}
CAPTION_DOMAINS: Tuple[str, ...] = ("photo", "scene")
_FULL_TEMPLATES = {"photo": PHOTO_CAPTION_TEMPLATES, "scene": SCENE_CAPTION_TEMPLATES}
# What caption() draws from, per domain argument (None: both domains, in CAPTION_DOMAINS order):
# (colour-only, shape-only, full) templates, built once rather than on every call of the render loop.
_CAPTION_GROUPS: Dict[Optional[str], Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...]]] = {
    key: tuple(tuple(t for d in doms for t in table[d])
               for table in (COLOUR_ONLY_TEMPLATES, SHAPE_ONLY_TEMPLATES, _FULL_TEMPLATES))
    for key, doms in [(None, CAPTION_DOMAINS)] + [(d, (d,)) for d in CAPTION_DOMAINS]
}


def caption_bank() -> Tuple[List[str], List[Tuple[Optional[str], Optional[str]]], List[str]]:
    """MiniBench's pretraining captions, for each the (colour, shape) it constrains (None = any),
    and its domain (:data:`CAPTION_DOMAINS`)."""
    texts: List[str] = []
    cons: List[Tuple[Optional[str], Optional[str]]] = []
    domains: List[str] = []
    for domain in CAPTION_DOMAINS:
        for colour, shape in CLASS_ATTRIBUTES:
            for t in _FULL_TEMPLATES[domain]:
                texts.append(t.format(f"{colour} {shape}"))
                cons.append((colour, shape))
                domains.append(domain)
        for colour in COLOUR_NAMES:
            for t in COLOUR_ONLY_TEMPLATES[domain]:
                texts.append(t.format(colour))
                cons.append((colour, None))
                domains.append(domain)
        for shape in SHAPES:
            for t in SHAPE_ONLY_TEMPLATES[domain]:
                texts.append(t.format(shape))
                cons.append((None, shape))
                domains.append(domain)
    return texts, cons, domains


def caption(label: int, rng: np.random.Generator, attribute_only_prob: float = 0.15,
            domain: Optional[str] = None) -> str:
    """A random caption for a MiniBench image of class ``label`` (possibly naming one attribute),
    from the templates of ``domain`` ("photo" or "scene"; None: both)."""
    if domain not in _CAPTION_GROUPS:
        raise ValueError(f"unknown caption domain {domain!r}; expected one of {CAPTION_DOMAINS}")
    colour_only, shape_only, full = _CAPTION_GROUPS[domain]
    colour, shape = CLASS_ATTRIBUTES[label]
    if rng.random() < attribute_only_prob:
        if rng.random() < 0.5:
            return colour_only[rng.integers(len(colour_only))].format(colour)
        return shape_only[rng.integers(len(shape_only))].format(shape)
    return full[rng.integers(len(full))].format(f"{colour} {shape}")


# --------------------------------------------------------------------------- drawing primitives


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    if shape == "square":
        r = r * 0.85
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "cross":
        a = r * 0.36
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
            (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
            (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            ang = -math.pi / 2 + k * math.pi / 5
            rad = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    raise ValueError(shape)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill,
                outline_width: int = 0) -> None:
    """A filled shape, or only its outline when ``outline_width`` > 0."""
    kw = dict(outline=fill, width=outline_width) if outline_width > 0 else dict(fill=fill)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **kw)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), **kw)


def _jitter(rgb: Sequence[int], rng: np.random.Generator, amount: float = 22.0) -> Tuple[int, int, int]:
    v = np.asarray(rgb, dtype=np.float64) + rng.normal(0.0, amount / 2.0, 3) + rng.normal(0.0, amount / 2.0)
    return tuple(int(x) for x in np.clip(v, 0, 255))


_GRIDS: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    if size not in _GRIDS:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        _GRIDS[size] = (yy, xx)
    return _GRIDS[size]


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32) * 255


def _background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """A float32 HxWx3 background: ``muted`` (random dull colour, blotches, optional stripes),
    ``vivid`` (saturated random hue with strong stripes) or ``paper`` (near-white)."""
    if kind == "paper":
        base = rng.uniform(215, 250) + rng.normal(0, 6, 3)
        coarse = rng.normal(0.0, 5.0, (4, 4, 3))
        amp = 0.0
    elif kind == "vivid":
        base = _hsv_to_rgb(rng.random(), rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
        coarse = rng.normal(0.0, 30.0, (4, 4, 3))
        amp = rng.uniform(35, 60)
    elif kind == "muted":
        base = rng.uniform(60, 170, 3) * rng.uniform(0.6, 1.0) + rng.uniform(0, 40)
        coarse = rng.normal(0.0, 22.0, (4, 4, 3))
        amp = rng.uniform(5, 18) if rng.random() < 0.5 else 0.0
    else:
        raise ValueError(f"background must be muted, vivid or paper, got {kind!r}")
    bg = np.repeat(np.repeat(coarse.astype(np.float32), size // 4, axis=0), size // 4, axis=1) + np.asarray(base, np.float32)
    if amp:
        period = rng.uniform(6, 20)
        ang = rng.uniform(0, math.pi)
        yy, xx = _grid(size)
        stripes = np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * (2 * math.pi / period))
        bg = bg + stripes[..., None] * np.float32(amp)
    return bg


def _canvas(rng: np.random.Generator, size: int, ss: int, kind: str) -> Image.Image:
    bg = np.clip(_background(rng, size, kind), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(np.repeat(bg, ss, axis=0), ss, axis=1), "RGB")


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, n_range, S: int, ss: int, jitter: float,
             grey: bool = False) -> None:
    """Thin strokes and dots in random colours (grey pencil strokes when ``grey``)."""
    for _ in range(int(rng.integers(n_range[0], n_range[1] + 1))):
        col = ALL_COLOURS[rng.integers(len(ALL_COLOURS))][1]
        col = _jitter((120, 120, 120) if grey else col, rng, jitter)
        x0, y0 = rng.uniform(0, S, 2)
        if rng.random() < 0.5:
            x1, y1 = x0 + rng.uniform(-12, 12) * ss, y0 + rng.uniform(-12, 12) * ss
            draw.line([x0, y0, x1, y1], fill=col, width=int(rng.integers(1, 3)) * ss // 2 + 1)
        else:
            rr = rng.uniform(1, 2.5) * ss
            draw.ellipse([x0 - rr, y0 - rr, x0 + rr, y0 + rr], fill=col)


def _finish(img: Image.Image, rng: np.random.Generator, p: dict) -> Image.Image:
    """Downsample the supersampled canvas, blur, add pixel noise."""
    size = int(p["image_size"])
    img = img.resize((size, size), Image.BOX)
    if float(p.get("blur", 0.0)) > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(p["blur"]) * rng.uniform(0.7, 1.0)))
    arr = np.asarray(img, dtype=np.float32)
    noise_std = float(p["noise_std"]) * rng.uniform(0.5, 1.0)
    arr = arr + rng.normal(0.0, noise_std, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def _params(defaults: dict, params: Optional[dict]) -> dict:
    p = dict(defaults)
    if params:
        p.update(params)
    return p


# --------------------------------------------------------------------------- MiniBench scenes


def render(label: int, rng: np.random.Generator, params: Optional[dict] = None) -> Image.Image:
    """Render one MiniBench scene of class ``label`` from ``rng`` (64x64 RGB by default)."""
    p = _params(SCENE_RENDER, params)
    size = int(p["image_size"])
    ss = 2  # supersampling factor for anti-aliased edges
    S = size * ss
    colour, shape = CLASS_ATTRIBUTES[label]
    sketch = p["style"] == "outline"
    if p["style"] not in ("fill", "outline"):
        raise ValueError(f"style must be fill or outline, got {p['style']!r}")
    ow = int(p["outline_width"]) * ss if sketch else 0
    jit = float(p["colour_jitter"])

    img = _canvas(rng, size, ss, p["background"])
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, p["num_clutter"], S, ss, jit, grey=sketch)

    # Target placement first (so distractors can avoid covering it), drawn last.
    t_side = rng.uniform(p["target_size"][0], p["target_size"][1]) * ss
    t_r = t_side / 2
    tx = rng.uniform(t_r + ss, S - t_r - ss)
    ty = rng.uniform(t_r + ss, S - t_r - ss)

    # Distractors: other (shape, colour) combinations, smaller; may share one attribute.
    n_d = int(rng.integers(p["num_distractors"][0], p["num_distractors"][1] + 1))
    d_max = min(p["distractor_size"][1], 0.75 * t_side / ss)
    for _ in range(n_d):
        while True:
            d_shape = SHAPES[rng.integers(len(SHAPES))]
            d_name, d_rgb = ALL_COLOURS[rng.integers(len(ALL_COLOURS))]
            if not (d_shape == shape and d_name == colour):
                break
        d_r = rng.uniform(p["distractor_size"][0], max(p["distractor_size"][0], d_max)) * ss / 2
        for _attempt in range(8):  # prefer positions not overlapping the target much
            dx = rng.uniform(d_r, S - d_r)
            dy = rng.uniform(d_r, S - d_r)
            if math.hypot(dx - tx, dy - ty) > 0.8 * (t_r + d_r):
                break
        _draw_shape(draw, d_shape, dx, dy, d_r, _jitter(d_rgb, rng, jit), ow)

    _draw_shape(draw, shape, tx, ty, t_r, _jitter(COLOURS[colour], rng, jit), ow)
    return _finish(img, rng, p)


# --------------------------------------------------------------------------- other vocabularies
# Each draws one object of its class (random colour: the class is the form, not the colour) among
# a little clutter on a muted background.

OBJECT_RENDER: Dict[str, object] = {
    "image_size": 64,
    "target_size": [30, 44],
    "num_clutter": [3, 8],
    "noise_std": 18.0,
    "background": "muted",
    "blur": 0.0,
    "colour_jitter": 22.0,
}
TEXTURE_RENDER: Dict[str, object] = {
    "image_size": 64,
    "period": [7.0, 14.0],  # pattern period in pixels
    "contrast": [0.55, 1.0],
    "num_clutter": [2, 6],
    "noise_std": 18.0,
    "blur": 0.0,
    "colour_jitter": 22.0,
}

GLYPHS: Tuple[str, ...] = ("A", "B", "E", "F", "H", "K", "M", "R", "S", "T", "X", "Z")
GLYPH_CLASSNAMES: Tuple[str, ...] = tuple(f"letter {g}" for g in GLYPHS)
TEXTURE_CLASSNAMES: Tuple[str, ...] = (
    "stripes", "checkerboard", "polka dots", "grid", "waves", "zigzag", "concentric rings",
    "crosshatch", "bricks", "spiral",
)
OBJECT_CLASSNAMES: Tuple[str, ...] = (
    "house", "tree", "sun", "flower", "heart", "arrow", "crescent moon", "ring", "hourglass", "fish",
)

_FONTS: Dict[int, ImageFont.FreeTypeFont] = {}


def _font(px: int):
    if px not in _FONTS:
        _FONTS[px] = ImageFont.load_default(size=px)  # Pillow's bundled scalable font
    return _FONTS[px]


def _object_colour(rng: np.random.Generator, jitter: float) -> Tuple[int, int, int]:
    return _jitter(ALL_COLOURS[rng.integers(len(ALL_COLOURS))][1], rng, jitter)


def _paste_mask(img: Image.Image, mask: Image.Image, colour) -> None:
    img.paste(Image.new("RGB", img.size, colour), (0, 0), mask)


def _draw_object(name: str, S: int, cx: float, cy: float, r: float, rng: np.random.Generator, jit: float) -> Image.Image:
    """An "L" mask (and a second colour region) of object ``name``: returns (mask1, mask2)."""
    m1 = Image.new("L", (S, S), 0)
    m2 = Image.new("L", (S, S), 0)
    d1, d2 = ImageDraw.Draw(m1), ImageDraw.Draw(m2)
    if name == "house":
        body = [cx - 0.7 * r, cy - 0.1 * r, cx + 0.7 * r, cy + r]
        d1.rectangle(body, fill=255)
        d2.polygon([(cx - 0.95 * r, cy - 0.1 * r), (cx, cy - r), (cx + 0.95 * r, cy - 0.1 * r)], fill=255)
        d1.rectangle([cx - 0.18 * r, cy + 0.4 * r, cx + 0.18 * r, cy + r], fill=0)  # door
    elif name == "tree":
        d2.rectangle([cx - 0.15 * r, cy + 0.1 * r, cx + 0.15 * r, cy + r], fill=255)
        d1.ellipse([cx - 0.7 * r, cy - r, cx + 0.7 * r, cy + 0.35 * r], fill=255)
    elif name == "sun":
        d1.ellipse([cx - 0.5 * r, cy - 0.5 * r, cx + 0.5 * r, cy + 0.5 * r], fill=255)
        w = max(2, int(r * 0.12))
        for k in range(8):
            a = k * math.pi / 4
            d1.line([cx + 0.65 * r * math.cos(a), cy + 0.65 * r * math.sin(a),
                     cx + r * math.cos(a), cy + r * math.sin(a)], fill=255, width=w)
    elif name == "flower":
        for k in range(6):
            a = k * math.pi / 3
            px, py = cx + 0.55 * r * math.cos(a), cy + 0.55 * r * math.sin(a)
            d1.ellipse([px - 0.4 * r, py - 0.4 * r, px + 0.4 * r, py + 0.4 * r], fill=255)
        d2.ellipse([cx - 0.3 * r, cy - 0.3 * r, cx + 0.3 * r, cy + 0.3 * r], fill=255)
        d1.ellipse([cx - 0.3 * r, cy - 0.3 * r, cx + 0.3 * r, cy + 0.3 * r], fill=0)
    elif name == "heart":
        a = 0.5 * r
        d1.ellipse([cx - r, cy - 0.75 * r, cx, cy + 0.25 * r], fill=255)
        d1.ellipse([cx, cy - 0.75 * r, cx + r, cy + 0.25 * r], fill=255)
        d1.polygon([(cx - 0.95 * r, cy - 0.1 * r), (cx + 0.95 * r, cy - 0.1 * r), (cx, cy + r)], fill=255)
        del a
    elif name == "arrow":
        d1.rectangle([cx - r, cy - 0.2 * r, cx + 0.2 * r, cy + 0.2 * r], fill=255)
        d1.polygon([(cx + 0.1 * r, cy - 0.65 * r), (cx + r, cy), (cx + 0.1 * r, cy + 0.65 * r)], fill=255)
    elif name == "crescent moon":
        d1.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d1.ellipse([cx - 0.45 * r, cy - 1.05 * r, cx + 1.25 * r, cy + 0.75 * r], fill=0)
    elif name == "ring":
        d1.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d1.ellipse([cx - 0.6 * r, cy - 0.6 * r, cx + 0.6 * r, cy + 0.6 * r], fill=0)
    elif name == "hourglass":
        d1.polygon([(cx - 0.7 * r, cy - r), (cx + 0.7 * r, cy - r), (cx, cy)], fill=255)
        d1.polygon([(cx - 0.7 * r, cy + r), (cx + 0.7 * r, cy + r), (cx, cy)], fill=255)
        d2.rectangle([cx - 0.8 * r, cy - r - 0.12 * r, cx + 0.8 * r, cy - r], fill=255)
        d2.rectangle([cx - 0.8 * r, cy + r, cx + 0.8 * r, cy + r + 0.12 * r], fill=255)
    elif name == "fish":
        d1.ellipse([cx - 0.75 * r, cy - 0.45 * r, cx + 0.55 * r, cy + 0.45 * r], fill=255)
        d1.polygon([(cx + 0.4 * r, cy), (cx + r, cy - 0.5 * r), (cx + r, cy + 0.5 * r)], fill=255)
        d1.ellipse([cx - 0.5 * r, cy - 0.15 * r, cx - 0.3 * r, cy + 0.05 * r], fill=0)  # eye
    else:
        raise ValueError(name)
    return m1, m2


def _cluttered_canvas(rng: np.random.Generator, params: Optional[dict]):
    """The background and clutter every object/glyph image starts from, at ``ss``x supersampling:
    (render params, image, ss, supersampled side S, colour jitter)."""
    p = _params(OBJECT_RENDER, params)
    size, ss = int(p["image_size"]), 2
    S = size * ss
    jit = float(p["colour_jitter"])
    img = _canvas(rng, size, ss, p["background"])
    _clutter(ImageDraw.Draw(img), rng, p["num_clutter"], S, ss, jit)
    return p, img, ss, S, jit


def render_object(label: int, rng: np.random.Generator, params: Optional[dict] = None) -> Image.Image:
    """One drawn object of ``OBJECT_CLASSNAMES[label]`` (random colours, rotation, size, place)."""
    p, img, ss, S, jit = _cluttered_canvas(rng, params)
    r = rng.uniform(p["target_size"][0], p["target_size"][1]) * ss / 2
    cx = rng.uniform(r + ss, S - r - ss)
    cy = rng.uniform(r + ss, S - r - ss)
    m1, m2 = _draw_object(OBJECT_CLASSNAMES[label], S, cx, cy, r, rng, jit)
    angle = float(rng.uniform(-25, 25))
    m1 = m1.rotate(angle, resample=Image.BILINEAR, center=(cx, cy))
    m2 = m2.rotate(angle, resample=Image.BILINEAR, center=(cx, cy))
    c1 = _object_colour(rng, jit)
    c2 = _object_colour(rng, jit)
    _paste_mask(img, m2, c2)
    _paste_mask(img, m1, c1)
    return _finish(img, rng, p)


def render_glyph(label: int, rng: np.random.Generator, params: Optional[dict] = None) -> Image.Image:
    """One letter ``GLYPHS[label]`` in Pillow's bundled font (random colour, size, tilt, place)."""
    p, img, ss, S, jit = _cluttered_canvas(rng, params)
    px = int(rng.uniform(p["target_size"][0], p["target_size"][1]) * ss)
    font = _font(px)
    mask = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(mask)
    l, t, rgt, b = d.textbbox((0, 0), GLYPHS[label], font=font)
    w, h = rgt - l, b - t
    x = rng.uniform(ss, max(ss + 1, S - w - ss)) - l
    y = rng.uniform(ss, max(ss + 1, S - h - ss)) - t
    d.text((x, y), GLYPHS[label], fill=255, font=font, stroke_width=int(rng.integers(0, 2)) * ss)
    mask = mask.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR, center=(x + l + w / 2, y + t + h / 2))
    _paste_mask(img, mask, _object_colour(rng, jit))
    return _finish(img, rng, p)


def _texture_field(name: str, u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Pattern intensity in [0, 1] at rotated pixel coordinates (u, v)."""
    k = 2 * math.pi / period

    def sq(x, duty=0.5):  # smooth square wave of phase x (radians)
        return np.clip((np.cos(x) - math.cos(math.pi * duty)) * 3.0 + 0.5, 0, 1)

    def line(x, width=0.18):  # thin periodic lines
        f = (x / (2 * math.pi)) % 1.0
        return np.clip(1.0 - np.minimum(f, 1 - f) / width * 2.0 + 0.5, 0, 1) * 1.0

    if name == "stripes":
        return sq(k * u)
    if name == "checkerboard":
        return np.clip((np.sign(np.sin(k * u)) * np.sign(np.sin(k * v)) * 2 + 1) / 2, 0, 1)
    if name == "polka dots":
        fu, fv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        return np.clip((0.28 - np.hypot(fu, fv)) * period * 1.2 + 0.5, 0, 1)
    if name == "grid":
        return np.maximum(line(k * u), line(k * v))
    if name == "waves":
        return sq(k * u + 2.2 * np.sin(k * v * 0.5))
    if name == "zigzag":
        tri = np.abs(((v / period) % 1.0) - 0.5) * 2.0  # triangle wave in [0, 1]
        return sq(k * u + 4.0 * tri)
    if name == "concentric rings":
        cu, cv = rng.uniform(-16, 16, 2)
        return sq(k * np.hypot(u - cu, v - cv))
    if name == "crosshatch":
        return np.maximum(line(k * (u + v) / math.sqrt(2)), line(k * (u - v) / math.sqrt(2)))
    if name == "bricks":
        row = np.floor(v / (period * 0.6))
        uu = u + (row % 2) * period * 0.5
        return 1.0 - np.maximum(line(2 * math.pi * uu / period, 0.12), line(2 * math.pi * v / (period * 0.6), 0.2))
    if name == "spiral":
        cu, cv = rng.uniform(-12, 12, 2)
        theta = np.arctan2(v - cv, u - cu)
        return sq(k * np.hypot(u - cu, v - cv) + 3 * theta)
    raise ValueError(name)


def render_texture(label: int, rng: np.random.Generator, params: Optional[dict] = None) -> Image.Image:
    """A two-colour pattern ``TEXTURE_CLASSNAMES[label]`` over the whole image (random colours,
    period, orientation, phase), a little clutter on top."""
    p = _params(TEXTURE_RENDER, params)
    size, ss = int(p["image_size"]), 2
    jit = float(p["colour_jitter"])
    yy, xx = _grid(size)
    ang = rng.uniform(0, math.pi)
    x0, y0 = rng.uniform(0, 64, 2)
    u = (xx - size / 2) * math.cos(ang) + (yy - size / 2) * math.sin(ang) + x0
    v = -(xx - size / 2) * math.sin(ang) + (yy - size / 2) * math.cos(ang) + y0
    period = rng.uniform(p["period"][0], p["period"][1])
    f = _texture_field(TEXTURE_CLASSNAMES[label], u, v, period, rng).astype(np.float32)
    fg = np.asarray(_object_colour(rng, jit), np.float32)
    bg = np.asarray(_background(rng, size, "muted"), np.float32)
    c = np.float32(rng.uniform(p["contrast"][0], p["contrast"][1]))
    arr = bg * (1 - c * f[..., None]) + fg * (c * f[..., None])
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    img = img.resize((size * ss, size * ss), Image.NEAREST)
    _clutter(ImageDraw.Draw(img), rng, p["num_clutter"], size * ss, ss, jit)
    return _finish(img, rng, p)


# --------------------------------------------------------------------------- vocabularies


@dataclass(frozen=True)
class Vocabulary:
    """A set of concepts, how to draw one, and how the pretraining stream draws it ("clean web
    photos": the benchmark's renderer with milder parameters, a deliberate domain gap)."""

    key: str
    classnames: Tuple[str, ...]
    render: Callable[..., Image.Image]
    render_defaults: Dict[str, object]
    pretrain_render: Dict[str, object]
    templates: Tuple[str, ...] = GENERIC_TEMPLATES


VOCABULARIES: Dict[str, Vocabulary] = {
    v.key: v
    for v in (
        Vocabulary("scenes", CLASSNAMES, render, SCENE_RENDER,
                   dict(target_size=[24, 34], num_distractors=[1, 3], num_clutter=[2, 6], noise_std=10.0),
                   CAPTION_TEMPLATES),
        Vocabulary("glyphs", GLYPH_CLASSNAMES, render_glyph, OBJECT_RENDER,
                   dict(target_size=[36, 48], num_clutter=[1, 4], noise_std=8.0)),
        Vocabulary("textures", TEXTURE_CLASSNAMES, render_texture, TEXTURE_RENDER,
                   dict(num_clutter=[0, 3], noise_std=8.0, contrast=[0.75, 1.0])),
        Vocabulary("objects", OBJECT_CLASSNAMES, render_object, OBJECT_RENDER,
                   dict(target_size=[36, 48], num_clutter=[1, 4], noise_std=8.0)),
    )
}


# --------------------------------------------------------------------------- generated datasets


@dataclass(frozen=True)
class Spec:
    """One generated dataset: which vocabulary, in which domain, how many images per split."""

    key: str  # config name (configs/datasets/<key>.yaml) and folder under $DATA
    name: str  # Dassl DATASET.NAME
    vocab: str
    role: str  # "source" | "xd" | "dg"
    domain: int  # seed-stream domain
    counts: Dict[str, int]
    render_overrides: Dict[str, object] = field(default_factory=dict)
    description: str = ""

    @property
    def split_filename(self) -> str:
        return f"split_zhou_{self.name}.json"

    @property
    def classnames(self) -> Tuple[str, ...]:
        return VOCABULARIES[self.vocab].classnames

    def defaults(self) -> dict:
        v = VOCABULARIES[self.vocab]
        return {"seed": 0, **{f"{k}_per_class": n for k, n in self.counts.items()}, "format": "png",
                **v.render_defaults, **self.render_overrides}


_XD_COUNTS = {"train": 4, "val": 2, "test": 250}
_DG_COUNTS = {"train": 1, "val": 1, "test": 105}  # train/val only because the split format needs them
SPECS: Dict[str, Spec] = {
    s.key: s
    for s in (
        Spec("minibench", "MiniBench", "scenes", "source", DOMAIN_BENCHMARK,
             {"train": DEFAULT_PARAMS["train_per_class"], "val": DEFAULT_PARAMS["val_per_class"],
              "test": DEFAULT_PARAMS["test_per_class"]},
             description="24 colour x shape classes in cluttered scenes; base = circle/square/triangle, "
                         "new = diamond/cross/star"),
        Spec("minibench_glyphs", "MiniBenchGlyphs", "glyphs", "xd", 10, dict(_XD_COUNTS, test=210),
             description="12 capital letters in random colours, sizes and tilts"),
        Spec("minibench_textures", "MiniBenchTextures", "textures", "xd", 11, _XD_COUNTS,
             description="10 two-colour patterns filling the image"),
        Spec("minibench_objects", "MiniBenchObjects", "objects", "xd", 12, _XD_COUNTS,
             description="10 drawn objects in random colours"),
        Spec("minibench_sketch", "MiniBenchSketch", "scenes", "dg", 20, _DG_COUNTS,
             dict(style="outline", background="paper", noise_std=6.0),
             description="MiniBench's classes as coloured outlines on paper"),
        Spec("minibench_noise", "MiniBenchNoise", "scenes", "dg", 21, _DG_COUNTS,
             dict(noise_std=55.0, blur=1.3),
             description="MiniBench's classes under heavy blur and pixel noise"),
        Spec("minibench_palette", "MiniBenchPalette", "scenes", "dg", 22, _DG_COUNTS,
             dict(background="vivid"),
             description="MiniBench's classes on saturated, strongly striped backgrounds"),
    )
}
assert SPECS["minibench"].defaults() == DEFAULT_PARAMS
assert SPECS["minibench"].split_filename == SPLIT_FILENAME


def get_spec(key: str) -> Spec:
    if key not in SPECS:
        raise ValueError(f"unknown generated dataset {key!r}; valid: {', '.join(SPECS)}")
    return SPECS[key]


def image_rng(seed: int, domain: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(domain), *map(int, keys)]))


def render_params(params: dict, vocab: str = "scenes") -> dict:
    """The subset of dataset params that affects rendering (shared with the pretraining stream)."""
    return {k: params[k] for k in VOCABULARIES[vocab].render_defaults}


# --------------------------------------------------------------------------- dataset on disk


def merge_params(defaults: dict, params: dict, what: str) -> dict:
    """``defaults`` updated with ``params`` (unknown keys: TypeError naming ``what``), JSON
    round-tripped so tuples/lists and ints/floats compare as they will be read back."""
    unknown = set(params) - set(defaults)
    if unknown:
        raise TypeError(f"unknown {what} parameter(s): {sorted(unknown)}")
    return json.loads(json.dumps({**defaults, **params}))


def _normalise_params(params: dict, key: str = "minibench") -> dict:
    spec = get_spec(key)
    p = merge_params(spec.defaults(), params, spec.name)
    if p["format"] not in ("png", "jpg"):
        raise ValueError("format must be 'png' or 'jpg'")
    if int(p["image_size"]) != 64:
        logger.warning("MiniBench is designed for 64x64 images (ViT-8 -> 8x8 patches); got %s", p["image_size"])
    return p


def _write_json_atomic(path: str, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")


def generate(dataset_dir: str, key: str = "minibench", **params) -> dict:
    """Write dataset ``key`` (default: MiniBench) under ``dataset_dir`` (overwriting images, split
    and meta); return its meta. ``params``: ``seed``, ``train_per_class``, ``val_per_class``,
    ``test_per_class``, ``format`` ("png"/"jpg") and the renderer's keys (see ``Spec.defaults``)."""
    spec = get_spec(key)
    vocab = VOCABULARIES[spec.vocab]
    p = _normalise_params(params, key)
    t0 = time.time()
    os.makedirs(dataset_dir, exist_ok=True)
    meta_path = os.path.join(dataset_dir, META_FILENAME)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # invalidate first: an interrupted rewrite must not look complete
    image_dir = os.path.join(dataset_dir, IMAGE_DIRNAME)
    if os.path.isdir(image_dir):
        shutil.rmtree(image_dir)
    rp = render_params(p, spec.vocab)
    ext = p["format"]
    names = spec.classnames
    split: Dict[str, list] = {}
    for label in range(len(names)):
        os.makedirs(os.path.join(image_dir, class_folder(label, names)), exist_ok=True)
    for split_name in ("train", "val", "test"):
        items = []
        for label in range(len(names)):
            folder = class_folder(label, names)
            for i in range(int(p[f"{split_name}_per_class"])):
                img = vocab.render(label, image_rng(p["seed"], spec.domain, SPLIT_IDS[split_name], label, i), rp)
                rel = f"{folder}/{split_name}_{i:04d}.{ext}"
                path = os.path.join(image_dir, rel)
                if ext == "png":
                    img.save(path, format="PNG", optimize=False)
                else:
                    img.save(path, format="JPEG", quality=95)
                items.append([rel, label, names[label]])
        split[split_name] = items
    _write_json_atomic(os.path.join(dataset_dir, spec.split_filename), split)
    meta = {
        "name": spec.name,
        "key": spec.key,
        "role": spec.role,
        "generator_version": GENERATOR_VERSION,
        "params": p,
        "classnames": list(names),
        "num_base": math.ceil(len(names) / 2),
        "num_images": {k: len(v) for k, v in split.items()},
        "description": spec.description,
    }
    if spec.vocab == "scenes":
        meta["attributes"] = {k: list(v) for k, v in attributes().items()}
        meta["class_attributes"] = [{"colour": c, "shape": s} for c, s in CLASS_ATTRIBUTES]
    _write_json_atomic(meta_path, meta)  # last: marks the generation complete
    logger.info("%s generated at %s in %.1fs (%s)", spec.name, dataset_dir, time.time() - t0, meta["num_images"])
    return meta


def read_meta(dataset_dir: str) -> Optional[dict]:
    path = os.path.join(dataset_dir, META_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def param_diff(wanted: dict, found: dict) -> Dict[str, Tuple[object, object]]:
    """Keys whose values differ: name -> (found, wanted)."""
    keys = sorted(set(wanted) | set(found))
    return {k: (found.get(k), wanted.get(k)) for k in keys if found.get(k) != wanted.get(k)}


def require_same_params(meta: dict, wanted: dict, version_key: str, version: int, what: str,
                        remedy: str) -> None:
    """Raise ``ValueError`` naming each parameter where a cached artefact differs from ``wanted``."""
    found = dict(meta.get("params", {}))
    found[version_key] = meta.get(version_key)
    diff = param_diff({**wanted, version_key: version}, found)
    if diff:
        desc = ", ".join(f"{k}: existing={a!r} requested={b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{what} was {'generated' if 'generator' in version_key else 'built'} with "
                         f"different parameters ({desc}). {remedy}")


def ensure(dataset_dir: str, key: str = "minibench", **params) -> dict:
    """Generate dataset ``key`` unless a complete one with the same parameters exists; return meta.

    A dataset written by another ``GENERATOR_VERSION`` is a stale cache: it is regenerated (with a
    warning). Raises ``ValueError`` naming the differing parameters when ``dataset_dir`` holds the
    current version generated with other parameters (e.g. another seed).
    """
    spec = get_spec(key)
    p = _normalise_params(params, key)
    os.makedirs(dataset_dir, exist_ok=True)
    lock = FileLock(os.path.join(dataset_dir, LOCK_FILENAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("Another process is generating %s at %s; waiting for it", spec.name, dataset_dir)
        lock.acquire()
    except OSError:  # a read-only $DATA: nobody can be generating there; a complete dataset is only read
        return _ensure_locked(dataset_dir, key, spec, p)
    try:
        return _ensure_locked(dataset_dir, key, spec, p)
    finally:
        lock.release()


def _ensure_locked(dataset_dir: str, key: str, spec: "Spec", p: dict) -> dict:
    meta = read_meta(dataset_dir)
    split_path = os.path.join(dataset_dir, spec.split_filename)
    if meta is not None and meta.get("generator_version") != GENERATOR_VERSION:
        logger.warning("%s at %s was written by generator version %s (current: %s); regenerating",
                       spec.name, dataset_dir, meta.get("generator_version"), GENERATOR_VERSION)
        return generate(dataset_dir, key, **p)
    if meta is not None and os.path.isfile(split_path):
        require_same_params(meta, p, "generator_version", GENERATOR_VERSION, f"{spec.name} at {dataset_dir}",
                            f"Delete the folder {dataset_dir!r} (or pick another root) to regenerate it.")
        logger.info("%s already present at %s; nothing to do", spec.name, dataset_dir)
        return meta
    if meta is not None:
        logger.warning("Incomplete %s at %s (meta.json present but %s missing); regenerating",
                       spec.name, dataset_dir, spec.split_filename)
    elif os.path.isdir(os.path.join(dataset_dir, IMAGE_DIRNAME)):
        logger.warning("Incomplete %s at %s (no meta.json); regenerating", spec.name, dataset_dir)
    return generate(dataset_dir, key, **p)


def read_split(dataset_dir: str, key: Optional[str] = None) -> Dict[str, List[Tuple[str, int, str]]]:
    """The split as ``{split: [(absolute_image_path, label, classname), ...]}`` (``key``: the
    dataset, default: read from meta.json, else MiniBench)."""
    if key is None:
        meta = read_meta(dataset_dir)
        key = (meta or {}).get("key", "minibench")
    with open(os.path.join(dataset_dir, get_spec(key).split_filename)) as f:
        split = json.load(f)
    image_dir = os.path.join(dataset_dir, IMAGE_DIRNAME)
    return {k: [(os.path.join(image_dir, r), int(l), c) for r, l, c in v] for k, v in split.items()}
