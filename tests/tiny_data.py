"""The built-in mini-benchmark (MiniBench) at test size, written by the real generator.

24 colour x shape classes in 64 px images (the tests resize them to the tiny CLIP's 32 px through
Dassl's transforms); base = the first 12 classes, new = the other 12.
"""

import os

from spotlighter.benchmark.data import CLASSNAMES, generate

BASE_CLASSNAMES = list(CLASSNAMES[: (len(CLASSNAMES) + 1) // 2])


def make_tiny_minibench(root: str, train: int = 4, val: int = 2, test: int = 3, seed: int = 0) -> str:
    folder = os.path.join(root, "minibench")
    generate(folder, seed=seed, train_per_class=train, val_per_class=val, test_per_class=test)
    return folder
