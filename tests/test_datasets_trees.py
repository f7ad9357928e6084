"""The dataset table (spotlighter/data_layout.py) against the config files, DATASETS.md and the
registry; the synthetic $DATA trees the dataset tests build are in tests/dataset_trees.py."""

import os
import re

from spotlighter import data_layout as layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    assert registry.dataset("dtd").roles == (("base2new", "base+new"), ("fewshot", "all classes"), ("xd", "target"))
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
