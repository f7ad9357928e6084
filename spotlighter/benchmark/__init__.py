"""MiniBench: a procedurally generated base-to-novel benchmark and a small seeded CLIP.

``python -m spotlighter.benchmark prepare --root DATA`` writes ``DATA/minibench`` (dataset in
CoOp split format) and ``DATA/minibench/clip/minibench_clip.pt`` (a plain CLIP state dict that
``clip.model.build_model`` / ``clip.load(path, jit=False)`` rebuilds).
"""

from .data import (  # noqa: F401
    BASE_CLASSES,
    CLASS_ATTRIBUTES,
    CLASSNAMES,
    NEW_CLASSES,
    NUM_BASE,
    NUM_CLASSES,
    SPLIT_FILENAME,
    attributes,
    caption,
    ensure,
    generate,
    read_split,
    render,
)

DATASET_SUBDIR = "minibench"
CLIP_RELPATH = "clip/minibench_clip.pt"
