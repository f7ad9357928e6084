"""Synthetic ``$DATA`` trees in each layout family of CoOp's DATASETS.md (no Dassl needed).

The builders are used by test_datasets.py (Dassl dataset classes) and test_check_data.py (the
Dassl-free checker); the tests here check the layout table against the config files.
"""

import importlib.util
import json
import os
import re

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_layout():
    """datasets/layout.py loaded by path (no Dassl, no package import)."""
    spec = importlib.util.spec_from_file_location("_layout_under_test", os.path.join(ROOT, "datasets", "layout.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


layout = load_layout()


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


# ------------------------------------------------------------------------------------------------
def test_every_layout_has_a_config_with_its_registered_name():
    for key, lay in layout.LAYOUTS.items():
        path = os.path.join(ROOT, "configs", "datasets", f"{key}.yaml")
        text = open(path).read()
        assert re.search(r'^DATASET:\s*\n\s+NAME:\s*"%s"\s*$' % lay.name, text, re.M), path
        assert os.path.isfile(os.path.join(ROOT, "datasets", f"{key}.py")), key


def test_layout_folder_names_match_coop():
    folders = {k: v.folder for k, v in layout.LAYOUTS.items()}
    assert folders["caltech101"] == "caltech-101"
    assert folders["food101"] == "food-101"
    assert folders["imagenet_a"] == "imagenet-adversarial"
    assert folders["imagenet_r"] == "imagenet-rendition"
    assert folders["imagenet_sketch"] == "imagenet-sketch"
    assert layout.LAYOUTS["dtd"].split_file == "split_zhou_DescribableTextures.json"
    from spotlighter import registry  # the protocols' datasets all have a layout

    assert all(d in layout.LAYOUTS for d in registry.BASE2NEW_DATASETS + registry.dg_targets("imagenet"))
    assert len(registry.BASE2NEW_DATASETS) == 11 and len(registry.xd_targets("imagenet")) == 10


def test_docs_have_every_section():
    doc = open(os.path.join(ROOT, "DATASETS.md")).read()
    anchors = set()
    for line in doc.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9\- ]", "", title).replace(" ", "-"))
    for lay in layout.LAYOUTS.values():
        assert lay.section in anchors, lay.section


def test_registry_reads_folders_and_sections_from_layout():
    """One table: the runner's $DATA folders and DATASETS.md sections are LAYOUTS' own."""
    from spotlighter import registry

    for key, lay in layout.LAYOUTS.items():
        ds = registry.dataset(key)
        assert (ds.folder, ds.section, ds.generated) == (lay.folder, lay.section, lay.kind == "generated"), key
    for name in registry.dataset_names():  # every protocol dataset with a config has a layout
        if os.path.isfile(os.path.join(ROOT, registry.dataset(name).config)):
            assert name in layout.LAYOUTS, name
    assert registry.dataset("dtd").roles == (("base2new", "base+new"), ("xd", "target"))
    assert ("xd", "source") in registry.dataset("imagenet").roles and ("dg", "source") in registry.dataset("imagenet").roles

def test_confinement_of_paths_to_the_dataset_folder(tmp_path):
    ddir = tmp_path / "data" / "dtd"
    (ddir / "images" / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.jpg").write_text("x")
    os.symlink(tmp_path / "elsewhere", ddir / "images" / "linked_class")  # a class folder leading out
    os.symlink(tmp_path / "elsewhere" / "x.jpg", ddir / "images" / "a" / "linked.jpg")
    c = layout.Confinement(str(ddir), str(ddir / "images"))
    assert c.problem(str(ddir / "images" / "a" / "1.jpg")) is None
    assert c.problem(str(ddir) + "/images//a/./1.jpg") is None  # written oddly, still inside
    assert c.problem(str(ddir / "images" / ".." / "split.json")) is None  # '..' that stays inside
    assert c.problem("/etc/passwd") == f"an absolute path outside the dataset folder {ddir}"
    assert c.problem(str(ddir / "images" / ".." / ".." / "x.jpg")) == f"'..' leads outside the dataset folder {ddir}"
    for link in (ddir / "images" / "linked_class" / "x.jpg", ddir / "images" / "a" / "linked.jpg"):
        assert c.problem(str(link)) == (f"a symlink leads to {tmp_path / 'elsewhere' / 'x.jpg'}, outside the "
                                        f"dataset folder {ddir}")
    # a dataset folder that is itself a symlink (to a larger disk) is fine
    os.symlink(ddir, tmp_path / "dtd-link")
    assert layout.Confinement(str(tmp_path / "dtd-link")).problem(str(tmp_path / "dtd-link" / "images" / "a" / "1.jpg")) is None
