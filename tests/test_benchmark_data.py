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


def test_new_classes_bring_new_words():
    """Base and new classes differ in what they are: no shape word is shared by the two halves
    (every colour is in both), so zero-shot must name shapes it never saw in a base prompt."""
    assert data.NUM_CLASSES == 24 and len(set(data.CLASSNAMES)) == data.NUM_CLASSES
    assert data.NUM_BASE == (data.NUM_CLASSES + 1) // 2
    base = [data.CLASS_ATTRIBUTES[i] for i in data.BASE_CLASSES]
    new = [data.CLASS_ATTRIBUTES[i] for i in data.NEW_CLASSES]
    assert {s for _, s in base} == set(data.BASE_SHAPES) == {"circle", "square", "triangle"}
    assert not {s for _, s in base} & {s for _, s in new}
    assert {c for c, _ in base} == {c for c, _ in new} == set(data.COLOUR_NAMES)
    assert data.attributes()["shape"] == data.SHAPES
    assert data.CLASSNAMES[0] == " ".join(data.CLASS_ATTRIBUTES[0])


def test_specs_registered_like_real_datasets():
    """Every generated dataset has a layout entry, a Dassl config, its own vocabulary (xd) or
    MiniBench's classes (dg), and a distinct seed domain."""
    from spotlighter import data_layout as layout

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    domains = [s.domain for s in data.SPECS.values()] + [data.DOMAIN_PRETRAIN, data.DOMAIN_PRETRAIN_EVAL]
    assert len(set(domains)) == len(domains)
    doc = open(os.path.join(root, "DATASETS.md")).read()
    for key, spec in data.SPECS.items():
        lay = layout.LAYOUTS[key]
        assert (lay.name, lay.folder, lay.split_file, lay.kind) == (spec.name, key, spec.split_filename, "generated")
        with open(os.path.join(root, "configs", "datasets", f"{key}.yaml")) as f:
            assert f'NAME: "{spec.name}"' in f.read()
        assert os.path.isfile(os.path.join(root, "datasets", f"{key}.py"))
        assert f"`{key}`" in doc
    scene_words = set(data.SHAPES) | set(data.COLOUR_NAMES)
    for key in ("minibench_glyphs", "minibench_textures", "minibench_objects"):
        names = data.SPECS[key].classnames
        assert data.SPECS[key].role == "xd" and len(names) >= 10
        assert not {w for n in names for w in n.split()} & scene_words  # own vocabulary
    for key in ("minibench_sketch", "minibench_noise", "minibench_palette"):
        assert data.SPECS[key].role == "dg" and data.SPECS[key].classnames == data.CLASSNAMES
    # power: >= 2,500 test images per half of MiniBench and per target (SE of one accuracy <= 1 point)
    assert data.NUM_BASE * data.DEFAULT_PARAMS["test_per_class"] >= 2500
    for key, spec in data.SPECS.items():
        if key != "minibench":
            assert len(spec.classnames) * spec.counts["test"] >= 2500, key


@pytest.mark.parametrize("key", [k for k in data.SPECS if k != "minibench"])
def test_every_target_is_deterministic_and_in_split_format(tmp_path, key):
    small = dict(train_per_class=1, val_per_class=1, test_per_class=1)
    a, b, c = (str(tmp_path / n) for n in "abc")
    meta = data.generate(a, key, seed=0, **small)
    data.generate(b, key, seed=0, **small)
    data.generate(c, key, seed=1, **small)
    split_name = data.SPECS[key].split_filename
    assert _read(os.path.join(a, split_name)) == _read(os.path.join(b, split_name))
    split = json.loads(_read(os.path.join(a, split_name)))
    assert meta["key"] == key and meta["classnames"] == list(data.SPECS[key].classnames)
    assert [label for _, label, _ in split["test"]] == list(range(len(data.SPECS[key].classnames)))
    for rel, _, _ in split["test"][:3]:
        assert _read(os.path.join(a, "images", rel)) == _read(os.path.join(b, "images", rel))
        assert _read(os.path.join(a, "images", rel)) != _read(os.path.join(c, "images", rel))
        im = Image.open(os.path.join(a, "images", rel))
        assert im.size == (64, 64) and im.mode == "RGB" and np.asarray(im).std() > 5
    assert data.read_split(a)["test"][0][0] == os.path.join(a, "images", split["test"][0][0])


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
    texts, cons, domains = data.caption_bank()
    assert set(caps) <= set(texts) and len(texts) == len(cons) == len(domains)


def test_caption_domains_split_the_templates():
    """Photo and scene captions are disjoint families; only photo captions say "photo"; a caption
    drawn for a domain is from that domain; the zero-shot template is a photo caption."""
    texts, cons, domains = data.caption_bank()
    by = {d: {t for t, dd in zip(texts, domains) if dd == d} for d in data.CAPTION_DOMAINS}
    assert set(domains) == set(data.CAPTION_DOMAINS) and not (by["photo"] & by["scene"])
    assert all("photo" not in t for t in by["scene"]) and len(texts) == len(set(texts))
    assert set(data.CAPTION_TEMPLATES) == set(data.PHOTO_CAPTION_TEMPLATES) | set(data.SCENE_CAPTION_TEMPLATES)
    assert "a photo of a {}." in data.PHOTO_CAPTION_TEMPLATES
    rng = np.random.default_rng(0)
    for d in data.CAPTION_DOMAINS:
        drawn = {data.caption(5, rng, 0.5, d) for _ in range(300)}
        assert drawn <= by[d] and len(drawn) > 3
    assert {data.caption(5, rng, 0.5) for _ in range(600)} & by["photo"]
    assert {data.caption(5, rng, 0.5) for _ in range(600)} & by["scene"]
    with pytest.raises(ValueError, match="unknown caption domain 'sketch'"):
        data.caption(5, rng, 0.5, "sketch")


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


def test_ensure_regenerates_another_generator_version_and_names_the_cause(tmp_path, caplog):
    d = str(tmp_path / "mb")
    data.ensure(d, seed=0, **SMALL)
    meta_path = os.path.join(d, data.META_FILENAME)
    meta = json.load(open(meta_path))
    meta["generator_version"] = data.GENERATOR_VERSION - 1  # a cache from an older generator
    json.dump(meta, open(meta_path, "w"))
    stale = os.path.join(d, "images", "red_circle", "train_0000.png")
    open(stale, "wb").write(b"old bytes")
    with caplog.at_level("WARNING", logger=data.logger.name):
        new_meta = data.ensure(d, seed=0, **SMALL)
    assert new_meta["generator_version"] == data.GENERATOR_VERSION
    assert _read(stale) != b"old bytes"  # regenerated, not just relabelled
    assert f"generator version {data.GENERATOR_VERSION - 1}" in caplog.text
    # meta.json present but the split file missing: says so (not "no meta.json")
    caplog.clear()
    os.remove(os.path.join(d, data.SPLIT_FILENAME))
    with caplog.at_level("WARNING", logger=data.logger.name):
        data.ensure(d, seed=0, **SMALL)
    assert "meta.json present but split_zhou_MiniBench.json missing" in caplog.text
    assert "no meta.json" not in caplog.text
    # no meta.json at all: says that
    caplog.clear()
    os.remove(meta_path)
    with caplog.at_level("WARNING", logger=data.logger.name):
        data.ensure(d, seed=0, **SMALL)
    assert "(no meta.json)" in caplog.text


def test_a_second_process_waits_for_the_generation_and_reuses_it(tmp_path):
    """Two jobs on a fresh $DATA: the second waits for the first's generation (a file lock), then
    finds it complete; it neither regenerates nor deletes the first one's images."""
    import subprocess
    import sys

    from filelock import FileLock

    d = str(tmp_path / "mb")
    os.makedirs(d)
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
            "from spotlighter.benchmark import data; "
            f"data.ensure({d!r}, seed=0, **{SMALL!r}); print('ensured', flush=True)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with FileLock(os.path.join(d, data.LOCK_FILENAME)):  # "the first job", generating
        second = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
        waiting = second.stderr.readline()
        assert "Another process is generating MiniBench at" in waiting and "waiting for it" in waiting
        meta = data.generate(d, seed=0, **SMALL)
        image = os.path.join(d, "images", "red_circle", "train_0000.png")
        before = os.stat(image).st_mtime_ns
        assert second.poll() is None  # still waiting while the lock is held
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0 and out.strip() == "ensured", err
    assert "already present" in err and "regenerating" not in err
    assert os.stat(image).st_mtime_ns == before and data.read_meta(d) == meta
