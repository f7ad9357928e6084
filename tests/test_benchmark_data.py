"""MiniBench generator: determinism, CoOp split format, composition structure, ensure()."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from spotlighter.benchmark import data

SMALL = dict(train_per_class=2, val_per_class=1, test_per_class=2)


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("minibench")
    a = str(root / "a")
    b = str(root / "b")
    c = str(root / "c")
    data.generate(a, seed=0, **SMALL)
    data.generate(b, seed=0, **SMALL)
    data.generate(c, seed=1, **SMALL)
    return a, b, c


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_determinism(small_sets):
    a, b, c = small_sets
    split_a = _read(os.path.join(a, data.SPLIT_FILENAME))
    assert split_a == _read(os.path.join(b, data.SPLIT_FILENAME))
    items = json.loads(split_a)["test"] + json.loads(split_a)["train"]
    sample = [items[0][0], items[7][0], items[-1][0]]
    for rel in sample:
        ia = _read(os.path.join(a, "images", rel))
        assert ia == _read(os.path.join(b, "images", rel))
        assert ia != _read(os.path.join(c, "images", rel))  # other seed -> other images
    meta_a = json.loads(_read(os.path.join(a, data.META_FILENAME)))
    meta_c = json.loads(_read(os.path.join(c, data.META_FILENAME)))
    assert meta_a["generator_version"] == data.GENERATOR_VERSION
    assert meta_a["params"]["seed"] == 0 and meta_c["params"]["seed"] == 1


def test_split_format_and_images(small_sets):
    a = small_sets[0]
    with open(os.path.join(a, data.SPLIT_FILENAME)) as f:
        split = json.load(f)
    assert set(split) == {"train", "val", "test"}
    n = data.NUM_CLASSES
    for name, per_class in (("train", 2), ("val", 1), ("test", 2)):
        items = split[name]
        assert len(items) == n * per_class
        labels = set()
        for rel, label, classname in items:
            assert isinstance(rel, str) and isinstance(label, int) and isinstance(classname, str)
            assert not os.path.isabs(rel)
            assert classname == data.CLASSNAMES[label]
            labels.add(label)
            path = os.path.join(a, "images", rel)
            assert os.path.isfile(path)
        assert labels == set(range(n))  # contiguous 0..C-1
    rel = split["test"][0][0]
    im = Image.open(os.path.join(a, "images", rel))
    assert im.size == (64, 64) and im.mode == "RGB"
    # read_split joins image_dir + relpath like CoOp datasets do
    abs_items = data.read_split(a)["val"]
    assert all(os.path.isfile(p) for p, _, _ in abs_items)


def test_classes_compose_across_base_and_new():
    assert data.NUM_CLASSES >= 20
    assert len(set(data.CLASSNAMES)) == data.NUM_CLASSES
    assert data.NUM_BASE == (data.NUM_CLASSES + 1) // 2
    base = [data.CLASS_ATTRIBUTES[i] for i in data.BASE_CLASSES]
    new = [data.CLASS_ATTRIBUTES[i] for i in data.NEW_CLASSES]
    assert not set(base) & set(new)  # no shared combination
    for k, values in enumerate((data.COLOUR_NAMES, data.SHAPES)):
        for v in values:  # every attribute value occurs in both halves
            assert any(c[k] == v for c in base) and any(c[k] == v for c in new)
    assert data.attributes()["shape"] == data.SHAPES
    assert data.CLASSNAMES[0] == " ".join(data.CLASS_ATTRIBUTES[0])


def test_render_and_caption():
    im = data.render(3, data.image_rng(0, data.DOMAIN_PRETRAIN, 5))
    assert im.size == (64, 64) and im.mode == "RGB"
    arr = np.asarray(im)
    assert arr.std() > 10  # cluttered, not a flat image
    rng = np.random.default_rng(0)
    caps = {data.caption(3, rng) for _ in range(200)}
    colour, shape = data.CLASS_ATTRIBUTES[3]
    assert len(caps) > 5
    assert all(colour in c or shape in c for c in caps)
    texts, cons = data.caption_bank()
    assert set(caps) <= set(texts) and len(texts) == len(cons)


def test_ensure_noop_mismatch_and_interrupted(tmp_path):
    d = str(tmp_path / "mb")
    meta = data.ensure(d, seed=0, **SMALL)
    meta_path = os.path.join(d, data.META_FILENAME)
    mtime = os.stat(meta_path).st_mtime_ns
    assert data.ensure(d, seed=0, **SMALL) == meta
    assert os.stat(meta_path).st_mtime_ns == mtime  # no-op
    with pytest.raises(ValueError) as e:
        data.ensure(d, seed=0, train_per_class=3, val_per_class=1, test_per_class=2)
    msg = str(e.value)
    assert "train_per_class" in msg and "Delete" in msg and d in msg
    assert "test_per_class" not in msg
    # Interrupted generation (meta.json written last is missing) -> regenerated.
    os.remove(meta_path)
    os.remove(os.path.join(d, "images", "red_circle", "train_0000.png"))
    data.ensure(d, seed=0, **SMALL)
    assert os.path.isfile(meta_path)
    assert os.path.isfile(os.path.join(d, "images", "red_circle", "train_0000.png"))
    with pytest.raises(TypeError):
        data.ensure(d, seed=0, not_a_param=1)
