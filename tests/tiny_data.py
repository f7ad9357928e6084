"""A tiny dataset in CoOp's split-json on-disk format, registered as ``MiniBench``.

Each class is a colour; images are noise plus a coloured square, so a few steps of training can
separate them. Used by the trainer integration tests (the real mini-benchmark is bigger).
"""

import json
import os

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40), (220, 40, 220), (40, 220, 220),
           (250, 140, 0), (120, 60, 20)]


def make_tiny_minibench(root: str, n_classes: int = 6, train: int = 4, val: int = 2, test: int = 3,
                        size: int = 32, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "minibench")
    images = os.path.join(folder, "images")
    split = {"train": [], "val": [], "test": []}
    for c in range(n_classes):
        name = f"colour {c}"
        os.makedirs(os.path.join(images, f"c{c}"), exist_ok=True)
        for part, count in (("train", train), ("val", val), ("test", test)):
            for i in range(count):
                arr = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
                x, y = rng.integers(0, size // 2, size=2)
                arr[y:y + size // 2, x:x + size // 2] = COLOURS[c % len(COLOURS)]
                rel = f"c{c}/{part}_{i}.png"
                Image.fromarray(arr).save(os.path.join(images, rel))
                split[part].append([rel, c, name])
    with open(os.path.join(folder, "split_zhou_MiniBench.json"), "w") as f:
        json.dump(split, f)
    return folder
