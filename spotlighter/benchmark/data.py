"""MiniBench: a procedurally generated, seeded base-to-novel benchmark that runs on a CPU.

Every class is a composition ``<colour> <shape>`` (6 shapes x 4 colours = 24 classes). Each
64x64 RGB image shows one *target* object of its class (always the biggest object) on a noisy,
textured background together with several smaller *distractor* objects of other shape/colour
combinations, so the global image feature is polluted by distractors and *where* the target
sits matters -- the situation that patch-token selection is meant for.

Base classes are the first ``ceil(C / 2)`` classes and new classes the rest (CoOp's
``subsample_classes`` rule). Classes are ordered so that every shape and every colour occurs in
both halves, while no combination does: new classes are reachable by composition.

The on-disk layout follows CoOp's split format::

    dataset_dir/
        images/<class_folder>/<split>_<index>.png
        split_zhou_MiniBench.json   {"train": [[relpath, label, classname], ...], "val": ..., "test": ...}
        meta.json                   generator version + parameters (written last: its presence
                                    marks a complete generation)

``relpath`` is relative to ``dataset_dir/images``. All randomness comes from
:class:`numpy.random.SeedSequence` keys ``(seed, DOMAIN, ...)``; the benchmark images use
``DOMAIN_BENCHMARK`` and the CLIP pretraining stream (see :mod:`spotlighter.benchmark.pretrain`)
``DOMAIN_PRETRAIN``, so pretraining never renders a benchmark image.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SPLIT_FILENAME = "split_zhou_MiniBench.json"
META_FILENAME = "meta.json"
IMAGE_DIRNAME = "images"

# Seed-stream domains (first-level keys after the user seed). Never reuse a value.
DOMAIN_BENCHMARK = 0
DOMAIN_PRETRAIN = 1
DOMAIN_PRETRAIN_EVAL = 2
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
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

DEFAULT_PARAMS: Dict[str, object] = {
    "seed": 0,
    "train_per_class": 32,
    "val_per_class": 8,
    "test_per_class": 25,
    "image_size": 64,
    "format": "png",
    # rendering (also used by the CLIP pretraining stream)
    "target_size": [22, 32],  # bounding-box side in pixels, inclusive range
    "distractor_size": [9, 16],
    "num_distractors": [3, 5],
    "num_clutter": [4, 10],  # tiny strokes / dots
    "noise_std": 18.0,
}


# --------------------------------------------------------------------------- classes


def _class_pairs() -> List[Tuple[str, str]]:
    """All (colour, shape) classes, base half first.

    A combination (shape i, colour j) is base iff ``(i + j)`` is even: each shape then has two base
    and two new colours, each colour three base and three new shapes.
    """
    base, new = [], []
    for i, shape in enumerate(SHAPES):
        for j, colour in enumerate(COLOUR_NAMES):
            (base if (i + j) % 2 == 0 else new).append((colour, shape))
    return base + new


CLASS_ATTRIBUTES: Tuple[Tuple[str, str], ...] = tuple(_class_pairs())  # (colour, shape) per label
CLASSNAMES: Tuple[str, ...] = tuple(f"{c} {s}" for c, s in CLASS_ATTRIBUTES)
NUM_CLASSES = len(CLASSNAMES)
NUM_BASE = math.ceil(NUM_CLASSES / 2)
BASE_CLASSES: Tuple[int, ...] = tuple(range(NUM_BASE))
NEW_CLASSES: Tuple[int, ...] = tuple(range(NUM_BASE, NUM_CLASSES))


def class_folder(label: int) -> str:
    return CLASSNAMES[label].replace(" ", "_")


def attributes() -> Dict[str, Tuple[str, ...]]:
    """Attribute name -> values, e.g. ``{"shape": (...), "colour": (...)}``."""
    return {"shape": SHAPES, "colour": COLOUR_NAMES}


# --------------------------------------------------------------------------- captions

CAPTION_TEMPLATES: Tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a {}.",
    "a picture of a {}.",
    "a {} among clutter.",
    "a big {} among small shapes.",
    "a large {} and some small distractors.",
    "a cluttered image with a {}.",
    "the biggest object is a {}.",
    "an image showing a {} on a noisy background.",
    "a low resolution photo of a {}.",
    "a drawing of a {}.",
    "a blurry and noisy low resolution picture of one large {} surrounded by several small objects.",
    "this is a synthetic image made of many small random shapes and one large {} in it.",
    # long captions exercise text positions ~20-32, where prompt learners (e.g. CoOp with 16
    # context tokens) put the class name
    "a synthetic low resolution picture with a noisy textured background, many small coloured "
    "shapes and thin strokes as distractors, and one large {} in it.",
)
COLOUR_ONLY_TEMPLATES: Tuple[str, ...] = (
    "a photo of something {}.",
    "a big {} object.",
    "the largest object is {}.",
)
SHAPE_ONLY_TEMPLATES: Tuple[str, ...] = (
    "a photo of a {}.",
    "a big {} shape.",
    "the largest object is a {}.",
)


def caption_bank() -> Tuple[List[str], List[Tuple[Optional[str], Optional[str]]]]:
    """All pretraining captions and, for each, the (colour, shape) it constrains (None = any)."""
    texts: List[str] = []
    cons: List[Tuple[Optional[str], Optional[str]]] = []
    for colour, shape in CLASS_ATTRIBUTES:
        for t in CAPTION_TEMPLATES:
            texts.append(t.format(f"{colour} {shape}"))
            cons.append((colour, shape))
    for colour in COLOUR_NAMES:
        for t in COLOUR_ONLY_TEMPLATES:
            texts.append(t.format(colour))
            cons.append((colour, None))
    for shape in SHAPES:
        for t in SHAPE_ONLY_TEMPLATES:
            texts.append(t.format(shape))
            cons.append((None, shape))
    return texts, cons


def caption(label: int, rng: np.random.Generator, attribute_only_prob: float = 0.15) -> str:
    """A random caption for an image of class ``label`` (possibly naming only one attribute)."""
    colour, shape = CLASS_ATTRIBUTES[label]
    if rng.random() < attribute_only_prob:
        if rng.random() < 0.5:
            return COLOUR_ONLY_TEMPLATES[rng.integers(len(COLOUR_ONLY_TEMPLATES))].format(colour)
        return SHAPE_ONLY_TEMPLATES[rng.integers(len(SHAPE_ONLY_TEMPLATES))].format(shape)
    return CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(f"{colour} {shape}")


# --------------------------------------------------------------------------- rendering


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


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=fill)


def _jitter(rgb: Sequence[int], rng: np.random.Generator, amount: float = 22.0) -> Tuple[int, int, int]:
    v = np.asarray(rgb, dtype=np.float64) + rng.normal(0.0, amount / 2.0, 3) + rng.normal(0.0, amount / 2.0)
    return tuple(int(x) for x in np.clip(v, 0, 255))


_GRIDS: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    if size not in _GRIDS:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        _GRIDS[size] = (yy, xx)
    return _GRIDS[size]


def render(label: int, rng: np.random.Generator, params: Optional[dict] = None) -> Image.Image:
    """Render one image of class ``label`` from ``rng`` (64x64 RGB by default)."""
    p = dict(DEFAULT_PARAMS)
    if params:
        p.update(params)
    size = int(p["image_size"])
    ss = 2  # supersampling factor for anti-aliased edges
    S = size * ss
    colour, shape = CLASS_ATTRIBUTES[label]

    # Background: muted random colour, low-frequency blotches, optional stripes, pixel noise.
    # (computed at the output resolution, then upsampled: only the shapes need supersampling)
    base = (rng.uniform(60, 170, 3) * rng.uniform(0.6, 1.0) + rng.uniform(0, 40)).astype(np.float32)
    coarse = rng.normal(0.0, 22.0, (4, 4, 3)).astype(np.float32)
    bg = np.repeat(np.repeat(coarse, size // 4, axis=0), size // 4, axis=1) + base
    if rng.random() < 0.5:
        period = rng.uniform(6, 20)
        ang = rng.uniform(0, math.pi)
        yy, xx = _grid(size)
        stripes = np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * (2 * math.pi / period))
        bg = bg + (stripes[..., None] * np.float32(rng.uniform(5, 18)))
    bg = np.clip(bg, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.repeat(np.repeat(bg, ss, axis=0), ss, axis=1), "RGB")
    draw = ImageDraw.Draw(img)

    all_colours = list(COLOURS.items()) + list(EXTRA_COLOURS.items())

    # Clutter: thin strokes and dots in random colours.
    for _ in range(int(rng.integers(p["num_clutter"][0], p["num_clutter"][1] + 1))):
        col = _jitter(all_colours[rng.integers(len(all_colours))][1], rng)
        x0, y0 = rng.uniform(0, S, 2)
        if rng.random() < 0.5:
            x1, y1 = x0 + rng.uniform(-12, 12) * ss, y0 + rng.uniform(-12, 12) * ss
            draw.line([x0, y0, x1, y1], fill=col, width=int(rng.integers(1, 3)) * ss // 2 + 1)
        else:
            rr = rng.uniform(1, 2.5) * ss
            draw.ellipse([x0 - rr, y0 - rr, x0 + rr, y0 + rr], fill=col)

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
            d_name, d_rgb = all_colours[rng.integers(len(all_colours))]
            if not (d_shape == shape and d_name == colour):
                break
        d_r = rng.uniform(p["distractor_size"][0], max(p["distractor_size"][0], d_max)) * ss / 2
        for _attempt in range(8):  # prefer positions not overlapping the target much
            dx = rng.uniform(d_r, S - d_r)
            dy = rng.uniform(d_r, S - d_r)
            if math.hypot(dx - tx, dy - ty) > 0.8 * (t_r + d_r):
                break
        _draw_shape(draw, d_shape, dx, dy, d_r, _jitter(d_rgb, rng))

    _draw_shape(draw, shape, tx, ty, t_r, _jitter(COLOURS[colour], rng))

    img = img.resize((size, size), Image.BOX)
    arr = np.asarray(img, dtype=np.float32)
    noise_std = float(p["noise_std"]) * rng.uniform(0.5, 1.0)
    arr = arr + rng.normal(0.0, noise_std, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def image_rng(seed: int, domain: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(domain), *map(int, keys)]))


RENDER_KEYS = ("image_size", "target_size", "distractor_size", "num_distractors", "num_clutter", "noise_std")


def render_params(params: dict) -> dict:
    """The subset of dataset params that affects rendering (shared with the pretraining stream)."""
    return {k: params[k] for k in RENDER_KEYS}


# --------------------------------------------------------------------------- dataset on disk


def merge_params(defaults: dict, params: dict, what: str) -> dict:
    """``defaults`` updated with ``params`` (unknown keys: TypeError naming ``what``), JSON
    round-tripped so tuples/lists and ints/floats compare as they will be read back."""
    unknown = set(params) - set(defaults)
    if unknown:
        raise TypeError(f"unknown {what} parameter(s): {sorted(unknown)}")
    return json.loads(json.dumps({**defaults, **params}))


def _normalise_params(params: dict) -> dict:
    p = merge_params(DEFAULT_PARAMS, params, "MiniBench")
    if p["format"] not in ("png", "jpg"):
        raise ValueError("format must be 'png' or 'jpg'")
    if int(p["image_size"]) != 64:
        logger.warning("MiniBench is designed for 64x64 images (ViT-8 -> 8x8 patches); got %s", p["image_size"])
    return p


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def generate(
    dataset_dir: str,
    *,
    seed: int = 0,
    train_per_class: int = DEFAULT_PARAMS["train_per_class"],
    val_per_class: int = DEFAULT_PARAMS["val_per_class"],
    test_per_class: int = DEFAULT_PARAMS["test_per_class"],
    image_size: int = DEFAULT_PARAMS["image_size"],
    **render_overrides,
) -> dict:
    """Write the benchmark under ``dataset_dir`` (overwriting images/split/meta); return meta.

    ``render_overrides`` may set ``format`` ("png"/"jpg"), ``target_size``, ``distractor_size``,
    ``num_distractors``, ``num_clutter`` and ``noise_std`` (see ``DEFAULT_PARAMS``).
    """
    p = _normalise_params(
        dict(
            seed=seed,
            train_per_class=train_per_class,
            val_per_class=val_per_class,
            test_per_class=test_per_class,
            image_size=image_size,
            **render_overrides,
        )
    )
    t0 = time.time()
    os.makedirs(dataset_dir, exist_ok=True)
    meta_path = os.path.join(dataset_dir, META_FILENAME)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # invalidate first: an interrupted rewrite must not look complete
    image_dir = os.path.join(dataset_dir, IMAGE_DIRNAME)
    if os.path.isdir(image_dir):
        shutil.rmtree(image_dir)
    rp = render_params(p)
    ext = p["format"]
    split: Dict[str, list] = {}
    counts = {"train": p["train_per_class"], "val": p["val_per_class"], "test": p["test_per_class"]}
    for label in range(NUM_CLASSES):
        os.makedirs(os.path.join(image_dir, class_folder(label)), exist_ok=True)
    for split_name, n in counts.items():
        items = []
        for label in range(NUM_CLASSES):
            folder = class_folder(label)
            for i in range(int(n)):
                img = render(label, image_rng(p["seed"], DOMAIN_BENCHMARK, SPLIT_IDS[split_name], label, i), rp)
                rel = f"{folder}/{split_name}_{i:04d}.{ext}"
                path = os.path.join(image_dir, rel)
                if ext == "png":
                    img.save(path, format="PNG", optimize=False)
                else:
                    img.save(path, format="JPEG", quality=95)
                items.append([rel, label, CLASSNAMES[label]])
        split[split_name] = items
    _write_json_atomic(os.path.join(dataset_dir, SPLIT_FILENAME), split)
    meta = {
        "name": "MiniBench",
        "generator_version": GENERATOR_VERSION,
        "params": p,
        "classnames": list(CLASSNAMES),
        "num_base": NUM_BASE,
        "attributes": {k: list(v) for k, v in attributes().items()},
        "class_attributes": [{"colour": c, "shape": s} for c, s in CLASS_ATTRIBUTES],
        "num_images": {k: len(v) for k, v in split.items()},
    }
    _write_json_atomic(meta_path, meta)  # last: marks the generation complete
    logger.info("MiniBench generated at %s in %.1fs (%s)", dataset_dir, time.time() - t0, meta["num_images"])
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


def ensure(dataset_dir: str, **params) -> dict:
    """Generate the benchmark unless a complete one with the same parameters exists; return meta.

    Raises ``ValueError`` naming the differing parameters when ``dataset_dir`` holds a benchmark
    generated with other parameters (or another generator version).
    """
    p = _normalise_params(params)
    meta = read_meta(dataset_dir)
    if meta is not None and os.path.isfile(os.path.join(dataset_dir, SPLIT_FILENAME)):
        require_same_params(meta, p, "generator_version", GENERATOR_VERSION, f"MiniBench at {dataset_dir}",
                            f"Delete the folder {dataset_dir!r} (or pick another root) to regenerate it.")
        logger.info("MiniBench already present at %s; nothing to do", dataset_dir)
        return meta
    if os.path.isdir(os.path.join(dataset_dir, IMAGE_DIRNAME)):
        logger.warning("Incomplete MiniBench at %s (no meta.json); regenerating", dataset_dir)
    return generate(dataset_dir, **p)


def read_split(dataset_dir: str) -> Dict[str, List[Tuple[str, int, str]]]:
    """The split as ``{split: [(absolute_image_path, label, classname), ...]}``."""
    with open(os.path.join(dataset_dir, SPLIT_FILENAME)) as f:
        split = json.load(f)
    image_dir = os.path.join(dataset_dir, IMAGE_DIRNAME)
    return {k: [(os.path.join(image_dir, r), int(l), c) for r, l, c in v] for k, v in split.items()}
