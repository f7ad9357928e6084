"""The Dassl dataset classes of ``datasets/`` on synthetic $DATA trees (needs upstream Dassl)."""

import json
import math
import os
import pickle
import random
import shutil
import sys
import warnings

import pytest

pytest.importorskip("dassl", reason="upstream Dassl.pytorch is not installed (CI has none); "
                                     "the dataset classes are Dassl datasets")

from dassl.data.datasets import DATASET_REGISTRY, Datum, DatasetBase  # noqa: E402
from dassl.utils import set_random_seed  # noqa: E402
from spotlighter.config import default_cfg  # noqa: E402

from dataset_trees import (  # noqa: E402
    FGVC_VARIANTS, WNIDS, fgvc_tree, imagenet_tree, make_image, split_tree, variant_tree,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != ROOT:  # the repository's datasets/, never an installed HuggingFace ``datasets``
    sys.path.insert(0, ROOT)
if not str(getattr(sys.modules.get("datasets"), "__file__", ROOT)).startswith(ROOT):
    del sys.modules["datasets"]

import datasets  # noqa: E402
from datasets import DatasetError  # noqa: E402
from datasets.common import ALLOW_FEWER_SHOTS_ENV  # noqa: E402
from spotlighter.data_layout import LAYOUTS  # noqa: E402

ALL_NAMES = [lay.name for lay in LAYOUTS.values()]  # every dataset of the one table


def make_cfg(data, name, shots=-1, seed=1, subsample="all"):
    cfg = default_cfg()
    cfg.DATASET.ROOT = str(data)
    cfg.DATASET.NAME = name
    cfg.DATASET.NUM_SHOTS = shots
    cfg.DATASET.SUBSAMPLE_CLASSES = subsample
    cfg.SEED = seed
    return cfg


def build(data, name, shots=-1, seed=1, subsample="all"):
    set_random_seed(seed)  # as Dassl's train.py does before building the trainer
    return DATASET_REGISTRY.get(name)(make_cfg(data, name, shots, seed, subsample))


def per_class(items):
    out = {}
    for it in items:
        out[it.label] = out.get(it.label, 0) + 1
    return out


def paths(items):
    return [it.impath for it in items]


def test_every_dataset_is_registered():
    registered = set(DATASET_REGISTRY.registered_names())
    assert set(ALL_NAMES) <= registered
    assert datasets.DatasetError is DatasetError


# ---------------------------------------------------------------------------------------------
# split-json family
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,name", [("oxford_pets", "OxfordPets"), ("dtd", "DescribableTextures"),
                                      ("caltech101", "Caltech101"), ("stanford_cars", "StanfordCars")])
def test_split_dataset_all_classes(tmp_path, key, name):
    ddir = split_tree(tmp_path, key)
    ds = build(tmp_path, name)
    assert ds.num_classes == 5
    assert ds.classnames == [f"class_{i}" for i in range(5)]
    assert len(ds.train_x) == 30 and len(ds.val) == 15 and len(ds.test) == 10
    assert all(p.startswith(ddir + os.sep) for p in paths(ds.test))
    assert all(isinstance(it, Datum) for it in ds.train_x)


@pytest.mark.parametrize("n_classes", [5, 4])
def test_base_new_split(tmp_path, n_classes):
    split_tree(tmp_path, "oxford_pets", n_classes=n_classes)
    m = math.ceil(n_classes / 2)
    base = build(tmp_path, "OxfordPets", subsample="base")
    new = build(tmp_path, "OxfordPets", subsample="new")
    assert base.classnames == [f"class_{i}" for i in range(m)]
    assert new.classnames == [f"class_{i}" for i in range(m, n_classes)]
    for ds, n in ((base, m), (new, n_classes - m)):
        for split in (ds.train_x, ds.val, ds.test):
            assert sorted({it.label for it in split}) == list(range(n))
    assert {it.classname for it in new.test if it.label == 0} == {f"class_{m}"}


def test_fewshot_counts_and_cache_roundtrip(tmp_path):
    ddir = split_tree(tmp_path, "dtd", per_class=(8, 6, 2))
    ds = build(tmp_path, "DescribableTextures", shots=5, seed=2)
    assert per_class(ds.train_x) == {c: 5 for c in range(5)}
    assert per_class(ds.val) == {c: 4 for c in range(5)}  # min(K, 4)
    cache = os.path.join(ddir, "split_fewshot", "shot_5-seed_2.pkl")
    assert os.path.isfile(cache)

    # the file is plain CoOp: a dict of Datum lists, readable with pickle.load
    with open(cache, "rb") as f:
        data = pickle.load(f)
    assert set(data) == {"train", "val"}
    assert all(type(it) is Datum for it in data["train"] + data["val"])
    assert [(it.impath, it.label, it.classname) for it in data["train"]] == \
        [(it.impath, it.label, it.classname) for it in ds.train_x]

    # re-read: same items, whatever the random state
    random.seed(12345)
    again = DATASET_REGISTRY.get("DescribableTextures")(make_cfg(tmp_path, "DescribableTextures", 5, 2))
    assert paths(again.train_x) == paths(ds.train_x) and paths(again.val) == paths(ds.val)

    small = build(tmp_path, "DescribableTextures", shots=2, seed=1)
    assert per_class(small.train_x) == {c: 2 for c in range(5)}
    assert per_class(small.val) == {c: 2 for c in range(5)}


def test_fewshot_sampling_identical_to_coop(tmp_path):
    """Same seed -> same sample as CoOp's code path (read_split, then Dassl's
    generate_fewshot_dataset on train with K and val with min(K, 4))."""
    ddir = split_tree(tmp_path, "oxford_pets", per_class=(9, 7, 1))
    ours = build(tmp_path, "OxfordPets", shots=4, seed=3)

    set_random_seed(3)
    split = json.load(open(os.path.join(ddir, "split_zhou_OxfordPets.json")))
    conv = lambda xs: [Datum(impath=os.path.join(ddir, "images", p), label=int(y), classname=c)
                       for p, y, c in xs]
    train, val = conv(split["train"]), conv(split["val"])
    base = DatasetBase.__new__(DatasetBase)
    train = base.generate_fewshot_dataset(train, num_shots=4)
    val = base.generate_fewshot_dataset(val, num_shots=min(4, 4))
    assert paths(ours.train_x) == paths(train)
    assert paths(ours.val) == paths(val)


def test_reads_cache_written_the_coop_way(tmp_path):
    ddir = split_tree(tmp_path, "caltech101", per_class=(6, 5, 2))
    split = json.load(open(os.path.join(ddir, "split_zhou_Caltech101.json")))
    img = os.path.join(ddir, "101_ObjectCategories")
    conv = lambda xs: [Datum(impath=os.path.join(img, p), label=int(y), classname=c) for p, y, c in xs]
    random.seed(999)  # any sample: ours must use it unchanged
    base = DatasetBase.__new__(DatasetBase)
    train = base.generate_fewshot_dataset(conv(split["train"]), num_shots=3)
    val = base.generate_fewshot_dataset(conv(split["val"]), num_shots=3)
    os.makedirs(os.path.join(ddir, "split_fewshot"))
    path = os.path.join(ddir, "split_fewshot", "shot_3-seed_1.pkl")
    with open(path, "wb") as f:
        pickle.dump({"train": train, "val": val}, f, protocol=pickle.HIGHEST_PROTOCOL)
    before = open(path, "rb").read()

    ds = build(tmp_path, "Caltech101", shots=3, seed=1)
    assert paths(ds.train_x) == paths(train) and paths(ds.val) == paths(val)
    assert open(path, "rb").read() == before  # read, never rewritten
    nb = build(tmp_path, "Caltech101", shots=3, seed=1, subsample="base")
    assert paths(nb.train_x) == [it.impath for it in train if it.label < 3]


def test_foreign_cache_is_remapped(tmp_path, caplog):
    """A cache copied from another machine: paths under another root are remapped."""
    here = tmp_path / "here"
    ddir = split_tree(here, "oxford_pets")
    build(here, "OxfordPets", shots=2, seed=1)
    cache = os.path.join(ddir, "split_fewshot", "shot_2-seed_1.pkl")
    with open(cache, "rb") as f:
        data = pickle.load(f)
    old_root = "/mnt/other machine/DATA"
    moved = {k: [Datum.__new__(Datum) for _ in v] for k, v in data.items()}
    for k in data:
        for new, it in zip(moved[k], data[k]):
            new.__dict__.update(it.__dict__)
            new._impath = it.impath.replace(str(here), old_root)
    with open(cache, "wb") as f:
        pickle.dump(moved, f, protocol=pickle.HIGHEST_PROTOCOL)

    with caplog.at_level("WARNING", logger="datasets.common"):
        ds = build(here, "OxfordPets", shots=2, seed=1)
    assert "its image paths are remapped to" in caplog.text
    assert paths(ds.train_x) == paths(data["train"])


def test_foreign_cache_not_remappable_is_a_clear_error(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    split_tree(a, "oxford_pets")
    build(a, "OxfordPets", shots=2, seed=1)
    split_tree(b, "oxford_pets", n_classes=5, per_class=(6, 3, 2))
    cache_b = os.path.join(b, "oxford_pets", "split_fewshot", "shot_2-seed_1.pkl")
    os.makedirs(os.path.dirname(cache_b))
    shutil.copy(os.path.join(a, "oxford_pets", "split_fewshot", "shot_2-seed_1.pkl"), cache_b)
    # same relative files exist under b -> remapped; now remove one under b -> error naming the cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build(b, "OxfordPets", shots=2, seed=1)
    with open(cache_b, "rb") as f:
        data = pickle.load(f)
    for it in data["train"]:
        it._impath = "/somewhere/else/imgs/" + os.path.basename(it.impath)
    with open(cache_b, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(DatasetError) as e:
        build(b, "OxfordPets", shots=2, seed=1)
    msg = str(e.value)
    assert cache_b in msg and "outside the current dataset folder" in msg and "Delete" in msg


def test_malformed_cache(tmp_path):
    ddir = split_tree(tmp_path, "oxford_pets")
    path = os.path.join(ddir, "split_fewshot", "shot_2-seed_1.pkl")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        pickle.dump({"train": []}, f)
    with pytest.raises(DatasetError, match=r"no key 'val'.*delete it"):
        build(tmp_path, "OxfordPets", shots=2)
    with open(path, "wb") as f:
        f.write(b"\x80\x05trunc")
    with pytest.raises(DatasetError, match="cannot read"):
        build(tmp_path, "OxfordPets", shots=2)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
def test_crafted_pickles_never_run(tmp_path, protocol):
    """A few-shot cache or ImageNet's preprocessed.pkl that names another callable is refused
    before anything is called; a genuine file of Datum objects (any protocol) is still read."""
    marker = tmp_path / "MARKER"
    ddir = split_tree(tmp_path, "oxford_pets")
    build(tmp_path, "OxfordPets", shots=2)  # writes a genuine cache
    cache = os.path.join(ddir, "split_fewshot", "shot_2-seed_1.pkl")
    with open(cache, "rb") as f:
        genuine = pickle.load(f)
    with open(cache, "wb") as f:
        pickle.dump(genuine, f, protocol=protocol)
    assert per_class(build(tmp_path, "OxfordPets", shots=2).train_x) == {c: 2 for c in range(5)}
    with open(cache, "wb") as f:
        pickle.dump({"train": [_RunsCode(marker)], "val": []}, f, protocol=protocol)
    with pytest.raises(DatasetError) as e:
        build(tmp_path, "OxfordPets", shots=2)
    assert not marker.exists()
    assert f"{cache} is not a file of Dassl Datum objects: it refers to posix.system" in str(e.value)
    assert "nothing in the file was run" in str(e.value)
    assert "re-created from the split file; the same seed gives the same sample" in str(e.value)

    inet = imagenet_tree(tmp_path)
    with open(os.path.join(inet, "preprocessed.pkl"), "wb") as f:
        pickle.dump({"train": [_RunsCode(marker)], "test": []}, f, protocol=protocol)
    with pytest.raises(DatasetError) as e:
        build(tmp_path, "ImageNet")
    assert not marker.exists()
    assert "preprocessed.pkl is not a file of Dassl Datum objects" in str(e.value)
    assert "re-created from images/ and classnames.txt" in str(e.value)


def test_datum_fields_are_checked(tmp_path):
    ddir = split_tree(tmp_path, "oxford_pets")
    path = os.path.join(ddir, "split_fewshot", "shot_2-seed_1.pkl")
    os.makedirs(os.path.dirname(path))
    bad = Datum(impath=os.path.join(ddir, "images", "class_0", "train_0.jpg"), label=0, classname="c")
    bad._label = "zero"
    with open(path, "wb") as f:
        pickle.dump({"train": [bad], "val": []}, f)
    with pytest.raises(DatasetError, match=r"a Datum's _label is a str, expected int.*delete it"):
        build(tmp_path, "OxfordPets", shots=2)


def test_too_many_shots_names_the_class(tmp_path, monkeypatch, caplog):
    split_tree(tmp_path, "oxford_pets", counts={3: (2, 3, 2)})
    with pytest.raises(DatasetError) as e:
        build(tmp_path, "OxfordPets", shots=4)
    msg = str(e.value)
    assert "'class_3' (label 3) has 2" in msg and "4 shots" in msg and ALLOW_FEWER_SHOTS_ENV in msg
    assert not os.path.exists(os.path.join(tmp_path, "oxford_pets", "split_fewshot", "shot_4-seed_1.pkl"))
    monkeypatch.setenv(ALLOW_FEWER_SHOTS_ENV, "1")
    with caplog.at_level("WARNING", logger="datasets.common"):
        ds = build(tmp_path, "OxfordPets", shots=4)
    assert "'class_3' (label 3) has 2" in caplog.text and "all their images are used" in caplog.text
    assert per_class(ds.train_x)[3] == 2


# ---------------------------------------------------------------------------------------------
# bad inputs of the split family
# ---------------------------------------------------------------------------------------------
def test_empty_root(tmp_path):
    with pytest.raises(DatasetError, match=r"--root \$DATA"):
        build("", "OxfordPets")


def test_missing_dataset_folder_names_path_and_section(tmp_path):
    with pytest.raises(DatasetError) as e:
        build(tmp_path, "Food101")
    assert os.path.join(str(tmp_path), "food-101") in str(e.value)
    assert "DATASETS.md#food101" in str(e.value)


def test_missing_split_file(tmp_path):
    ddir = split_tree(tmp_path, "eurosat")
    os.remove(os.path.join(ddir, "split_zhou_EuroSAT.json"))
    with pytest.raises(DatasetError) as e:
        build(tmp_path, "EuroSAT")
    assert "split_zhou_EuroSAT.json" in str(e.value) and "DATASETS.md#eurosat" in str(e.value)


@pytest.mark.parametrize("content,expect", [
    ("{not json", "not valid JSON"),
    ('{"train": [["a.jpg", 0, "x"]], "test": [["a.jpg", 0, "x"]]}', "no key 'val'"),
    ('{"train": [["a.jpg", 0]], "val": [], "test": []}', "entry 0 of key 'train'"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_split_file(tmp_path, content, expect):
    ddir = split_tree(tmp_path, "ucf101")
    path = os.path.join(ddir, "split_zhou_UCF101.json")
    with open(path, "w") as f:
        f.write(content)
    with pytest.raises(DatasetError) as e:
        build(tmp_path, "UCF101")
    assert path in str(e.value) and expect in str(e.value)


def test_listed_image_missing_or_empty(tmp_path):
    ddir = split_tree(tmp_path, "sun397")
    gone = os.path.join(ddir, "SUN397", "class_2", "test_1.jpg")
    os.remove(gone)
    with pytest.raises(DatasetError) as e:
        build(tmp_path, "SUN397")
    assert gone in str(e.value) and "missing" in str(e.value) and "test split" in str(e.value)
    make_image(gone)
    empty = os.path.join(ddir, "SUN397", "class_0", "train_0.jpg")
    open(empty, "w").close()
    with pytest.raises(DatasetError, match=r"train_0.jpg \(empty\)"):
        build(tmp_path, "SUN397")


def test_bad_subsample_value(tmp_path):
    split_tree(tmp_path, "oxford_pets")
    with pytest.raises(DatasetError, match="valid values: all, base, new"):
        build(tmp_path, "OxfordPets", subsample="half")


# ---------------------------------------------------------------------------------------------
# ImageNet, variants, FGVCAircraft, MiniBench
# ---------------------------------------------------------------------------------------------
def test_imagenet_folder_layout(tmp_path):
    ddir = imagenet_tree(tmp_path, n_classes=4, train_per=5, val_per=2)
    ds = build(tmp_path, "ImageNet")
    assert ds.num_classes == 4
    assert ds.classnames == [f"class name {i}" for i in range(4)]
    assert len(ds.train_x) == 20 and len(ds.test) == 8 and paths(ds.val) == paths(ds.test)
    assert os.path.isfile(os.path.join(ddir, "preprocessed.pkl"))
    with open(os.path.join(ddir, "preprocessed.pkl"), "rb") as f:
        pre = pickle.load(f)
    assert set(pre) == {"train", "test"} and len(pre["train"]) == 20

    fs = build(tmp_path, "ImageNet", shots=3, seed=1, subsample="base")
    assert per_class(fs.train_x) == {0: 3, 1: 3} and fs.classnames == ["class name 0", "class name 1"]
    with open(os.path.join(ddir, "split_fewshot", "shot_3-seed_1.pkl"), "rb") as f:
        cache = pickle.load(f)
    assert set(cache) == {"train"}  # CoOp's ImageNet cache
    new = build(tmp_path, "ImageNet", shots=3, seed=1, subsample="new")
    assert new.classnames == ["class name 2", "class name 3"] and len(new.test) == 4


def test_imagenet_missing_classnames(tmp_path):
    ddir = imagenet_tree(tmp_path)
    os.remove(os.path.join(ddir, "classnames.txt"))
    with pytest.raises(DatasetError, match=r"classnames.txt is missing.*DATASETS.md#imagenet"):
        build(tmp_path, "ImageNet")


@pytest.mark.parametrize("key,name", [("imagenet_a", "ImageNetA"), ("imagenet_r", "ImageNetR"),
                                      ("imagenet_sketch", "ImageNetSketch")])
def test_imagenet_variant(tmp_path, key, name):
    variant_tree(tmp_path, key, wnid_idx=(1, 3), per=2)
    ds = build(tmp_path, name, shots=16, subsample="base")  # both ignored, as in CoOp
    assert ds.classnames == ["class name 1", "class name 3"]
    assert sorted({it.label for it in ds.test}) == [0, 1] and len(ds.test) == 4


def test_imagenetv2_and_classnames_fallback(tmp_path):
    imagenet_tree(tmp_path)
    variant_tree(tmp_path, "imagenetv2", per=1, classnames=False)
    ds = build(tmp_path, "ImageNetV2")  # uses $DATA/imagenet/classnames.txt
    assert ds.num_classes == len(WNIDS) and ds.classnames[5] == "class name 5"
    os.remove(os.path.join(tmp_path, "imagenet", "classnames.txt"))
    with pytest.raises(DatasetError, match=r"imagenetv2/classnames.txt is missing: copy ImageNet"):
        build(tmp_path, "ImageNetV2")


def test_fgvc_aircraft(tmp_path):
    ddir = fgvc_tree(tmp_path, per=(3, 2, 2))
    ds = build(tmp_path, "FGVCAircraft")
    assert ds.classnames == FGVC_VARIANTS and len(ds.train_x) == 12
    fs = build(tmp_path, "FGVCAircraft", shots=2, subsample="new")
    assert fs.classnames == FGVC_VARIANTS[2:] and per_class(fs.train_x) == {0: 2, 1: 2}
    os.remove(os.path.join(ddir, "images_variant_val.txt"))
    with pytest.raises(DatasetError, match=r"images_variant_val.txt is missing.*#fgvcaircraft"):
        build(tmp_path, "FGVCAircraft")


def test_minibench_reads_split_and_reports_missing_generator(tmp_path, monkeypatch):
    split_tree(tmp_path, "minibench", n_classes=4)
    ds = build(tmp_path, "MiniBench", shots=2, subsample="new")
    assert ds.classnames == ["class_2", "class_3"]

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setitem(sys.modules, "spotlighter.benchmark.data", None)  # not importable
    with pytest.raises(DatasetError, match="spotlighter.benchmark.data is not importable"):
        build(empty, "MiniBench")


def test_minibench_generated_on_first_use(tmp_path, monkeypatch):
    import types

    calls = []

    def ensure(dataset_dir, key):
        calls.append((dataset_dir, key))
        split_tree(os.path.dirname(dataset_dir), "minibench", n_classes=2)

    monkeypatch.setitem(sys.modules, "spotlighter.benchmark.data", types.SimpleNamespace(ensure=ensure))
    ds = build(tmp_path, "MiniBench")
    assert calls == [(os.path.join(str(tmp_path), "minibench"), "minibench")] and ds.num_classes == 2


def test_minibench_generator_error_is_a_dataset_error(tmp_path, monkeypatch):
    import types

    def ensure(dataset_dir, key):
        raise ValueError("generated with other parameters: n_classes: existing=24 requested=12")

    monkeypatch.setitem(sys.modules, "spotlighter.benchmark.data", types.SimpleNamespace(ensure=ensure))
    with pytest.raises(DatasetError, match="MiniBench: cannot generate .*other parameters"):
        build(tmp_path, "MiniBench")


def test_minibench_with_the_real_generator(tmp_path):
    """The project's generator writes what the MiniBench dataset reads (CoOp split format)."""
    gen = pytest.importorskip("spotlighter.benchmark.data", reason="spotlighter.benchmark is not importable")
    gen.ensure(os.path.join(tmp_path, "minibench"), train_per_class=2, val_per_class=1, test_per_class=1)  # small
    ds = build(tmp_path, "MiniBench", shots=2, seed=1, subsample="base")
    n = len(json.load(open(os.path.join(tmp_path, "minibench", "split_zhou_MiniBench.json")))["test"])
    assert n > 0 and ds.num_classes >= 1 and set(per_class(ds.train_x).values()) == {2}
    new = build(tmp_path, "MiniBench", shots=2, seed=1, subsample="new")
    assert not set(ds.classnames) & set(new.classnames)


@pytest.mark.parametrize("name,key", [("MiniBenchGlyphs", "minibench_glyphs"), ("MiniBenchSketch", "minibench_sketch")])
def test_minibench_targets_with_the_real_generator(tmp_path, name, key):
    """xd/dg targets: generated, read in CoOp's split format, all classes; a broken split file says
    how to regenerate it (there is nothing to re-download)."""
    gen = pytest.importorskip("spotlighter.benchmark.data", reason="spotlighter.benchmark is not importable")
    folder = os.path.join(tmp_path, key)
    gen.ensure(folder, key, train_per_class=1, val_per_class=1, test_per_class=2)
    ds = build(tmp_path, name)
    assert ds.classnames == list(gen.SPECS[key].classnames)
    assert len(ds.test) == 2 * len(ds.classnames)
    with open(os.path.join(folder, gen.SPECS[key].split_filename), "w") as f:
        f.write("{not json")
    with pytest.raises(DatasetError) as e:
        build(tmp_path, name)
    msg = str(e.value)
    assert "regenerate it: delete the folder" in msg and folder in msg and "spotlighter.benchmark prepare" in msg
    assert "re-download" not in msg


# ---- image paths stay inside the dataset folder (DATASET.ALLOW_OUTSIDE_PATHS) ----------------------
def _rewrite_split(ddir, name, key, index, relpath):
    path = os.path.join(ddir, f"split_zhou_{name}.json")
    with open(path) as f:
        split = json.load(f)
    split[key][index][0] = relpath
    with open(path, "w") as f:
        json.dump(split, f)
    return path


def _outside_image(tmp_path):
    return make_image(str(tmp_path / "elsewhere" / "secret.jpg"))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_split_entry_outside_the_dataset_folder_is_refused(tmp_path, how):
    data = tmp_path / "data"
    ddir = split_tree(data, "dtd")
    secret = _outside_image(tmp_path)
    if how == "absolute":
        rel = secret
    elif how == "dotdot":
        rel = "../../../elsewhere/secret.jpg"
    else:
        rel = "class_0/linked.jpg"
        os.symlink(secret, os.path.join(ddir, "images", rel))
    split = _rewrite_split(ddir, "DescribableTextures", "val", 2, rel)
    with pytest.raises(DatasetError) as e:
        build(data, "DescribableTextures")
    msg = str(e.value)
    assert msg.startswith(f"split file {split}: entry 2 of key 'val' is {rel!r}: ")
    assert f"outside the dataset folder {ddir}" in msg and "DATASET.ALLOW_OUTSIDE_PATHS True" in msg
    if how == "symlink":
        assert f"a symlink leads to {secret}" in msg
    cfg = make_cfg(data, "DescribableTextures")
    cfg.DATASET.ALLOW_OUTSIDE_PATHS = True  # the documented way to allow it
    ds = DATASET_REGISTRY.get("DescribableTextures")(cfg)
    assert os.path.realpath(ds.val[2].impath) == secret


def test_symlinked_dataset_and_image_folders_are_inside(tmp_path):
    """A dataset folder, or its image folder, that is itself a symlink (e.g. to a larger disk) is fine."""
    disk = tmp_path / "disk"
    split_tree(disk, "dtd")
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(disk / "dtd", data / "dtd")
    assert len(build(data, "DescribableTextures").test) == 10
    other = tmp_path / "other"
    ddir = split_tree(other, "eurosat")
    os.rename(os.path.join(ddir, "2750"), tmp_path / "eurosat-images")
    os.symlink(tmp_path / "eurosat-images", os.path.join(ddir, "2750"))
    assert len(build(other, "EuroSAT").test) == 10


@pytest.mark.parametrize("how", ["dotdot", "symlink"])
def test_few_shot_cache_item_outside_the_dataset_folder_is_refused(tmp_path, how):
    data = tmp_path / "data"
    ddir = split_tree(data, "oxford_pets")
    build(data, "OxfordPets", shots=2, seed=1)
    cache = os.path.join(ddir, "split_fewshot", "shot_2-seed_1.pkl")
    secret = _outside_image(tmp_path)
    with open(cache, "rb") as f:
        cached = pickle.load(f)
    if how == "dotdot":  # starts with the dataset folder, then climbs out
        bad = os.path.join(ddir, "images", "..", "..", "..", "elsewhere", "secret.jpg")
    else:
        bad = os.path.join(ddir, "images", "class_0", "linked.jpg")
        os.symlink(secret, bad)
    cached["train"][1]._impath = bad
    with open(cache, "wb") as f:
        pickle.dump(cached, f)
    with pytest.raises(DatasetError) as e:
        build(data, "OxfordPets", shots=2, seed=1)
    msg = str(e.value)
    assert msg.startswith(f"{cache}: item 1 of 'train' is {bad!r}: ") and "DATASET.ALLOW_OUTSIDE_PATHS" in msg


def test_fgvc_line_outside_the_dataset_folder_is_refused(tmp_path):
    ddir = fgvc_tree(tmp_path)
    listing = os.path.join(ddir, "images_variant_test.txt")
    lines = open(listing).read().splitlines()
    lines[0] = "../../x " + lines[0].split(" ", 1)[1]
    open(listing, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as e:
        build(tmp_path, "FGVCAircraft")
    assert str(e.value).startswith(f"{listing}: line 1 is '../../x': '..' leads outside the dataset folder {ddir}")


def test_two_classes_with_one_name_are_refused(tmp_path):
    ddir = split_tree(tmp_path, "dtd")
    split_path = os.path.join(ddir, "split_zhou_DescribableTextures.json")
    with open(split_path) as f:
        split = json.load(f)
    for key in split:  # class 3 is renamed to class 1's name
        split[key] = [[r, lab, "class_1" if lab == 3 else name] for r, lab, name in split[key]]
    with open(split_path, "w") as f:
        json.dump(split, f)
    with pytest.raises(DatasetError) as e:
        build(tmp_path, "DescribableTextures")
    assert str(e.value).startswith(f"DescribableTextures: 1 class name(s) are shared by different classes in "
                                   f"{split_path}: 'class_1' is the name of labels 1, 3. Each class needs its own name")


def test_imagenet_classnames_with_a_repeated_name_are_refused(tmp_path):
    ddir = imagenet_tree(tmp_path)
    names = os.path.join(ddir, "classnames.txt")
    lines = open(names).read().splitlines()
    lines[2] = lines[2].split(" ", 1)[0] + " " + lines[0].split(" ", 1)[1]
    open(names, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as e:
        build(tmp_path, "ImageNet")
    assert f"shared by different classes in {names}: " in str(e.value) and "labels 0, 2" in str(e.value)
