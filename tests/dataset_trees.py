"""Synthetic ``$DATA`` trees in each layout family of CoOp's DATASETS.md (no Dassl needed), for
test_datasets.py (the Dassl dataset classes) and test_check_data.py (the Dassl-free checker)."""

import json
import os

from PIL import Image

from spotlighter import data_layout as layout


def make_image(path, color=(10, 20, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path, format="JPEG")
    return path


def split_tree(data, key, counts=None, n_classes=5, per_class=(6, 3, 2)):
    """A split-json dataset (OxfordPets/DTD/Caltech101 style): images under its image folder and a
    ``split_zhou_<Name>.json``. ``counts`` optionally maps class index -> (train, val, test)."""
    lay = layout.LAYOUTS[key]
    ddir = os.path.join(data, lay.folder)
    idir = os.path.join(ddir, lay.image_dir) if lay.image_dir else ddir
    split = {"train": [], "val": [], "test": []}
    for c in range(n_classes):
        cname = f"class_{c}"
        n = (counts or {}).get(c, per_class)
        for s, k in zip(("train", "val", "test"), n):
            for i in range(k):
                rel = f"{cname}/{s}_{i}.jpg"
                make_image(os.path.join(idir, rel))
                split[s].append([rel, c, cname])
    with open(os.path.join(ddir, lay.split_file), "w") as f:
        json.dump(split, f)
    return ddir


WNIDS = [f"n{i:08d}" for i in range(6)]


def imagenet_tree(data, n_classes=4, train_per=5, val_per=2):
    ddir = os.path.join(data, "imagenet")
    os.makedirs(ddir, exist_ok=True)
    with open(os.path.join(ddir, "classnames.txt"), "w") as f:
        for i, w in enumerate(WNIDS):
            f.write(f"{w} class name {i}\n")
    for c in range(n_classes):
        for i in range(train_per):
            make_image(os.path.join(ddir, "images", "train", WNIDS[c], f"{WNIDS[c]}_{i}.JPEG"))
        for i in range(val_per):
            make_image(os.path.join(ddir, "images", "val", WNIDS[c], f"val_{c}_{i}.JPEG"))
    return ddir


def variant_tree(data, key, wnid_idx=(1, 3), per=2, classnames=True):
    lay = layout.LAYOUTS[key]
    ddir = os.path.join(data, lay.folder)
    idir = os.path.join(ddir, lay.image_dir)
    os.makedirs(idir, exist_ok=True)
    if classnames:
        with open(os.path.join(ddir, "classnames.txt"), "w") as f:
            for i, w in enumerate(WNIDS):
                f.write(f"{w} class name {i}\n")
    if key == "imagenetv2":
        for c in range(len(WNIDS)):
            for i in range(per):
                make_image(os.path.join(idir, str(c), f"{i}.jpeg"))
    else:
        for c in wnid_idx:
            for i in range(per):
                make_image(os.path.join(idir, WNIDS[c], f"{i}.jpg"))
        with open(os.path.join(idir, "README.txt"), "w") as f:
            f.write("not a class\n")
    return ddir


FGVC_VARIANTS = ["707-320", "A300B4", "Cessna 172", "DC-3"]


def fgvc_tree(data, per=(3, 2, 2)):
    ddir = os.path.join(data, "fgvc_aircraft")
    os.makedirs(os.path.join(ddir, "images"), exist_ok=True)
    with open(os.path.join(ddir, "variants.txt"), "w") as f:
        f.write("\n".join(FGVC_VARIANTS) + "\n")
    n = 1000000
    for s, k in zip(("train", "val", "test"), per):
        lines = []
        for v in FGVC_VARIANTS:
            for _ in range(k):
                n += 1
                make_image(os.path.join(ddir, "images", f"{n}.jpg"))
                lines.append(f"{n} {v}")
        with open(os.path.join(ddir, f"images_variant_{s}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return ddir
