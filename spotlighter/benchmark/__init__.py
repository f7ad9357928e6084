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

from .paths import CLIP_RELPATH, DATASET_SUBDIR, clip_path, dataset_dir  # noqa: F401
from .recipe import DEFAULT_CLIP_PARAMS, build_clip  # noqa: F401

# Only the bottom of the package is imported here (no torch, nothing that loads a CLIP), so that
# spotlighter.backbone can check a MiniBench CLIP through .paths and .reference without an import
# circle. Preparing and pretraining: .cli.prepare, .pretrain.ensure_clip / load_clip / zeroshot_accuracy.
