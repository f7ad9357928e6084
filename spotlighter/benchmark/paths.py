"""Where MiniBench's files live under the data root, and the sidecar beside its CLIP.

The lowest module of the benchmark: plain ``os`` (and :mod:`.data`'s table of generated datasets, to
name a dataset). ``DATA/minibench/clip/minibench_clip.pt`` is MiniBench's CLIP; ``path + ".json"``
is its sidecar (recipe, origin, digest).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from . import data

DATASET_SUBDIR = "minibench"
#: File name of MiniBench's CLIP (``DATA/minibench/clip/minibench_clip.pt``).
CLIP_FILE = "minibench_clip.pt"
CLIP_RELPATH = os.path.join("clip", CLIP_FILE)
CLIP_LOCK = ".clip.lock"  # in the MiniBench folder, held while its CLIP is checked or built


def dataset_dir(root: str, key: str = "minibench") -> str:
    """Folder of generated dataset ``key`` under the data root (the folder name is the key)."""
    data.get_spec(key)
    return os.path.join(root, key)


def clip_path(root: str) -> str:
    return os.path.join(dataset_dir(root), CLIP_RELPATH)


def data_root(path: str) -> Optional[str]:
    """``DATA`` when ``path`` is ``DATA/minibench/clip/minibench_clip.pt`` (where ``prepare`` puts it), else None."""
    full = os.path.abspath(path)
    tail = os.sep + os.path.join(DATASET_SUBDIR, CLIP_RELPATH)
    return full[: -len(tail)] or os.sep if full.endswith(tail) else None


def sidecar_path(path: str) -> str:
    return path + ".json"


def read_sidecar(path: str) -> Optional[dict]:
    sp = sidecar_path(path)
    if not (os.path.isfile(sp) and os.path.isfile(path)):
        return None
    with open(sp) as f:
        return json.load(f)
