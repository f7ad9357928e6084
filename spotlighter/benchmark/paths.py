"""Where MiniBench's files live under the data root, and the sidecar beside its CLIP.

The lowest module of the benchmark: plain ``os`` (and :mod:`.data`'s table of generated datasets, to
name a dataset). ``DATA/minibench/clip/minibench_clip.pt`` is MiniBench's CLIP and
``minibench_clip_teacher.pt`` beside it the teacher-size one; ``path + ".json"`` is a CLIP's sidecar
(recipe, origin, digest).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from . import data
from .recipe import STUDENT, TEACHER

DATASET_SUBDIR = "minibench"
#: File name of MiniBench's CLIP (``DATA/minibench/clip/minibench_clip.pt``).
CLIP_FILE = "minibench_clip.pt"
CLIP_SUBDIR = "clip"  # DATA/minibench/clip/ holds every CLIP size
CLIP_RELPATH = os.path.join(CLIP_SUBDIR, CLIP_FILE)
#: File name of each CLIP size (:data:`.recipe.CLIP_SIZES`) in ``DATA/minibench/clip/``.
CLIP_FILES = {STUDENT: CLIP_FILE, TEACHER: "minibench_clip_teacher.pt"}
CLIP_LOCK = ".clip.lock"  # in the MiniBench folder, held while its CLIP is checked or built


def dataset_dir(root: str, key: str = "minibench") -> str:
    """Folder of generated dataset ``key`` under the data root (the folder name is the key)."""
    data.get_spec(key)
    return os.path.join(root, key)


def clip_path(root: str, size: str = STUDENT) -> str:
    """Where ``prepare`` puts the CLIP of size ``size`` under the data root."""
    return os.path.join(dataset_dir(root), CLIP_SUBDIR, CLIP_FILES[size])


def data_root(path: str) -> Optional[str]:
    """``DATA`` when ``path`` is one of ``DATA/minibench/clip/``'s CLIPs (where ``prepare`` puts them), else None."""
    full = os.path.abspath(path)
    for name in CLIP_FILES.values():
        tail = os.sep + os.path.join(DATASET_SUBDIR, CLIP_SUBDIR, name)
        if full.endswith(tail):
            return full[: -len(tail)] or os.sep
    return None


def sidecar_path(path: str) -> str:
    return path + ".json"


def read_sidecar(path: str) -> Optional[dict]:
    sp = sidecar_path(path)
    if not (os.path.isfile(sp) and os.path.isfile(path)):
        return None
    with open(sp) as f:
        return json.load(f)
