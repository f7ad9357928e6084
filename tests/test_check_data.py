"""scripts/check_data.py on synthetic $DATA trees (no Dassl needed)."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import types
from unittest import mock

from dataset_trees import fgvc_tree, imagenet_tree, split_tree, variant_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_data.py")


def check(*args, env=None):
    e = {k: v for k, v in os.environ.items() if k != "DATA"}
    e.update(env or {})
    r = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                       timeout=60, env=e, cwd="/")
    return r.returncode, r.stdout, r.stderr


DATUM_MODULE = "dassl.data.datasets.base_dataset"


class Datum:  # pickles exactly like dassl's Datum (same module, name and attributes), without Dassl
    def __init__(self, impath, label, classname):
        self._impath, self._label, self._domain, self._classname = impath, label, 0, classname


Datum.__module__ = DATUM_MODULE


def dump_as_dassl(obj, path, protocol=pickle.HIGHEST_PROTOCOL):
    """pickle.dump with this Datum standing in for dassl's in sys.modules during the dump."""
    names = ["dassl", "dassl.data", "dassl.data.datasets", DATUM_MODULE]
    fake = {n: types.ModuleType(n) for n in names}
    fake[DATUM_MODULE].Datum = Datum
    with mock.patch.dict(sys.modules, fake), open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cache(path, impaths, protocol=pickle.HIGHEST_PROTOCOL):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    items = [Datum(p, 0, "c") for p in impaths]
    dump_as_dassl({"train": items, "val": items}, path, protocol)


def test_all_layouts_ok(tmp_path):
    split_tree(tmp_path, "oxford_pets")
    split_tree(tmp_path, "stanford_cars")
    imagenet_tree(tmp_path)
    variant_tree(tmp_path, "imagenet_a")
    variant_tree(tmp_path, "imagenetv2")
    fgvc_tree(tmp_path)
    code, out, err = check("--root", tmp_path, "oxford_pets", "stanford_cars", "imagenet", "imagenet_a",
                           "imagenetv2", "fgvc_aircraft", "minibench")
    assert code == 0, out + err
    assert "OK      oxford_pets: 5 classes, train/val/test 30/15/10" in out
    assert "OK      fgvc_aircraft: 4 classes" in out
    assert "SKIP    minibench" in out and "All 7 dataset(s) are ready." in out


def test_reports_what_is_missing(tmp_path):
    ddir = split_tree(tmp_path, "dtd")
    os.remove(os.path.join(ddir, "images", "class_1", "val_0.jpg"))
    eur = split_tree(tmp_path, "eurosat")
    os.remove(os.path.join(eur, "split_zhou_EuroSAT.json"))
    ucf = split_tree(tmp_path, "ucf101")
    json.dump({"train": [], "val": [], "test": []}, open(os.path.join(ucf, "split_zhou_UCF101.json"), "w"))
    code, out, _ = check("--root", tmp_path, "dtd", "eurosat", "ucf101", "food101")
    assert code == 1
    assert "PROBLEM dtd" in out and "class_1/val_0.jpg (missing)" in out and "DATASETS.md#dtd" in out
    assert "split_zhou_EuroSAT.json is missing" in out
    assert "key 'train' must be a non-empty list" in out
    assert f"MISSING food101: folder {tmp_path}/food-101 does not exist; see DATASETS.md#food101" in out
    assert "4 of 4 dataset(s) need attention" in out


def test_quick_skips_image_checks(tmp_path):
    ddir = split_tree(tmp_path, "dtd")
    os.remove(os.path.join(ddir, "images", "class_1", "val_0.jpg"))
    code, out, _ = check("--root", tmp_path, "--quick", "dtd")
    assert code == 0, out


def test_imagenet_and_variant_problems(tmp_path):
    ddir = imagenet_tree(tmp_path)
    os.remove(os.path.join(ddir, "classnames.txt"))
    variant_tree(tmp_path, "imagenet_r", classnames=False)
    code, out, _ = check("--root", tmp_path, "imagenet", "imagenet_r")
    assert code == 1
    assert "imagenet/classnames.txt is missing" in out
    assert "imagenet-rendition/classnames.txt is missing: copy $DATA/imagenet/classnames.txt" in out


def test_few_shot_caches(tmp_path):
    ddir = split_tree(tmp_path, "oxford_pets")
    img = os.path.join(ddir, "images", "class_0", "train_0.jpg")
    write_cache(os.path.join(ddir, "split_fewshot", "shot_1-seed_1.pkl"), [img])
    code, out, _ = check("--root", tmp_path, "oxford_pets")
    assert code == 0 and "note:" not in out

    # copied from another machine, same files here: a note (the dataset remaps the paths)
    write_cache(os.path.join(ddir, "split_fewshot", "shot_1-seed_2.pkl"),
                ["/old/DATA/oxford_pets/images/class_0/train_0.jpg"])
    code, out, _ = check("--root", tmp_path, "oxford_pets")
    assert code == 0 and "shot_1-seed_2.pkl was written under another $DATA" in out

    # paths that exist nowhere here: a problem, with the fix
    write_cache(os.path.join(ddir, "split_fewshot", "shot_1-seed_3.pkl"), ["/elsewhere/x.jpg"])
    with open(os.path.join(ddir, "split_fewshot", "shot_2-seed_1.pkl"), "wb") as f:
        f.write(b"garbage")
    code, out, _ = check("--root", tmp_path, "oxford_pets")
    assert code == 1
    assert "shot_1-seed_3.pkl lists images outside" in out and "delete it" in out
    assert "shot_2-seed_1.pkl cannot be read" in out


def test_bad_arguments(tmp_path):
    code, _, err = check()
    assert code == 2 and "--root $DATA" in err
    code, _, err = check("--root", tmp_path / "nope")
    assert code == 2 and "does not exist" in err
    code, _, err = check("--root", tmp_path, "pets")
    assert code == 2 and "unknown dataset(s) pets. Valid datasets: imagenet caltech101" in err
    code, out, _ = check("dtd", env={"DATA": str(tmp_path)})  # DATA from the environment
    assert code == 1 and "MISSING dtd" in out


def test_does_not_need_dassl(tmp_path):
    """The checker runs with dassl made unimportable."""
    split_tree(tmp_path, "dtd")
    write_cache(os.path.join(tmp_path, "dtd", "split_fewshot", "shot_1-seed_1.pkl"),
                [os.path.join(tmp_path, "dtd", "images", "class_0", "train_0.jpg")])
    block = tmp_path / "block"
    block.mkdir()
    (block / "dassl.py").write_text("raise ImportError('dassl blocked for this test')\n")
    (block / "torch.py").write_text("raise ImportError('torch blocked for this test')\n")
    code, out, err = check("--root", tmp_path, "dtd", env={"PYTHONPATH": str(block)})
    assert code == 0, out + err


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickles_are_refused_without_running(tmp_path):
    ddir = split_tree(tmp_path, "dtd")
    marker = tmp_path / "MARKER"
    os.makedirs(os.path.join(ddir, "split_fewshot"))
    cache = os.path.join(ddir, "split_fewshot", "shot_1-seed_1.pkl")
    with open(cache, "wb") as f:
        pickle.dump({"train": [_RunsCode(marker)], "val": []}, f)
    inet = imagenet_tree(tmp_path)
    with open(os.path.join(inet, "preprocessed.pkl"), "wb") as f:
        pickle.dump({"train": [_RunsCode(marker)], "test": []}, f, protocol=0)
    code, out, err = check("--root", tmp_path, "dtd", "imagenet")
    assert code == 1 and not marker.exists(), out + err
    assert (f"{cache} is not a file of Dassl Datum objects: it refers to posix.system, which a file of "
            "Dassl Datum objects never contains (refused; nothing in the file was run)") in out
    assert "delete it (it is re-created from the split file; the same seed gives the same sample)" in out
    assert "preprocessed.pkl is not a file of Dassl Datum objects" in out
    assert "delete it (it is re-created from images/ and classnames.txt)" in out


def test_malformed_caches_are_problems_not_tracebacks(tmp_path):
    ddir = split_tree(tmp_path, "dtd")
    folder = os.path.join(ddir, "split_fewshot")
    os.makedirs(folder)
    dump_as_dassl({"train": 5, "val": []}, os.path.join(folder, "shot_1-seed_1.pkl"))
    dump_as_dassl({"train": [Datum(7, 0, "c")], "val": []}, os.path.join(folder, "shot_1-seed_2.pkl"))
    dump_as_dassl([1, 2], os.path.join(folder, "shot_1-seed_3.pkl"))
    img = os.path.join(ddir, "images", "class_0", "train_0.jpg")
    write_cache(os.path.join(folder, "shot_1-seed_4.pkl"), [img], protocol=0)  # old protocols still read
    code, out, err = check("--root", tmp_path, "dtd")
    assert code == 1 and "Traceback" not in err, out + err
    assert "shot_1-seed_1.pkl: 'train' is a int, not a list of Dassl Datum objects" in out
    assert "shot_1-seed_2.pkl: 'train' is not a list of Dassl Datum objects (a Datum's _impath is a int" in out
    assert "shot_1-seed_3.pkl lacks the keys ['train', 'val'] (has a list)" in out
    assert "shot_1-seed_4.pkl" not in out


def test_images_are_decoded(tmp_path):
    ddir = split_tree(tmp_path, "dtd")
    fewshot_img = os.path.join(ddir, "images", "class_0", "train_0.jpg")
    test_img = os.path.join(ddir, "images", "class_1", "test_0.jpg")
    write_cache(os.path.join(ddir, "split_fewshot", "shot_1-seed_1.pkl"), [fewshot_img])
    code, out, _ = check("--root", tmp_path, "dtd")
    assert code == 0, out
    for path in (fewshot_img, test_img):
        with open(path, "wb") as f:
            f.write(b"\xff\xd8\xff" + b"not a jpeg" * 10)  # exists, not empty: only decoding tells
    code, out, _ = check("--root", tmp_path, "dtd")  # default: few-shot images + a sample of each split
    assert code == 1
    assert f"1 image(s) of split_fewshot/shot_1-seed_1.pkl cannot be decoded" in out
    assert f"1 image(s) of the test split cannot be decoded" in out and f"{test_img} (cannot be decoded: " in out
    code, out, _ = check("--root", tmp_path, "--sample", "0", "dtd")  # few-shot images only
    assert code == 1 and "shot_1-seed_1.pkl cannot be decoded" in out and "test split" not in out
    code, out, _ = check("--root", tmp_path, "--sample", "0", "--full", "dtd")
    assert "the test split cannot be decoded (all images checked)" in out
    code, out, _ = check("--root", tmp_path, "--quick", "dtd")
    assert code == 0, out


def test_images_of_a_cache_from_another_machine_are_decoded_where_they_are_read(tmp_path):
    ddir = split_tree(tmp_path, "dtd")
    write_cache(os.path.join(ddir, "split_fewshot", "shot_1-seed_1.pkl"), ["/old/DATA/dtd/images/class_0/train_0.jpg"])
    with open(os.path.join(ddir, "images", "class_0", "train_0.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff" + b"not a jpeg" * 10)
    code, out, _ = check("--root", tmp_path, "--sample", "0", "dtd")
    assert code == 1 and "was written under another $DATA" in out
    assert "1 image(s) of split_fewshot/shot_1-seed_1.pkl cannot be decoded" in out


def test_protocol_checks_the_registry_datasets(tmp_path):
    variant_tree(tmp_path, "imagenet_a")
    code, out, _ = check("--root", tmp_path, "--protocol", "dg")
    assert code == 1 and "Checking 4 dataset(s)" in out
    assert "OK      imagenet_a" in out and "MISSING imagenet_r" in out and "MISSING imagenetv2" in out
    code, out, _ = check("--root", tmp_path, "--protocol", "xd")
    assert "Checking 11 dataset(s)" in out and "MISSING imagenet:" in out and "MISSING ucf101" in out
    code, _, err = check("--root", tmp_path, "--protocol", "xd", "--source", "dtd")
    assert code == 2 and "'dtd' is not a cross-dataset source; known sources: imagenet, minibench" in err
    code, _, err = check("--root", tmp_path, "--protocol", "dg", "dtd")
    assert code == 2 and "either --protocol or DATASET" in err


def test_images_outside_the_dataset_folder_are_problems(tmp_path):
    data = tmp_path / "data"
    ddir = split_tree(data, "dtd")
    secret = str(tmp_path / "elsewhere" / "secret.jpg")
    os.makedirs(os.path.dirname(secret))
    shutil.copy(os.path.join(ddir, "images", "class_0", "train_0.jpg"), secret)
    split_path = os.path.join(ddir, "split_zhou_DescribableTextures.json")
    split = json.load(open(split_path))
    split["test"][1][0] = secret
    json.dump(split, open(split_path, "w"))
    code, out, _ = check("--root", data, "dtd")
    assert code == 1 and "PROBLEM dtd" in out
    assert (f"split file {split_path}: entry 1 of key 'test' is {secret!r}: an absolute path outside the "
            f"dataset folder {ddir}. Image paths must stay inside the dataset folder") in out
    code, out, _ = check("--root", data, "--allow-outside-paths", "dtd")
    assert code == 0 and "OK      dtd" in out, out

    split["test"][1][0] = "class_0/linked.jpg"
    json.dump(split, open(split_path, "w"))
    os.symlink(secret, os.path.join(ddir, "images", "class_0", "linked.jpg"))
    code, out, _ = check("--root", data, "dtd")
    assert code == 1 and f"a symlink leads to {secret}, outside the dataset folder {ddir}" in out


def test_few_shot_cache_outside_the_dataset_folder_is_a_problem(tmp_path):
    ddir = split_tree(tmp_path, "dtd")
    bad = os.path.join(ddir, "images", "..", "..", "..", "etc", "passwd")
    write_cache(os.path.join(ddir, "split_fewshot", "shot_1-seed_1.pkl"),
                [os.path.join(ddir, "images", "class_0", "train_0.jpg"), bad])
    code, out, _ = check("--root", tmp_path, "dtd")
    assert code == 1 and f"item 1 of 'train' is {bad!r}: '..' leads outside the dataset folder {ddir}" in out


def decompression_bomb(path, pixels):
    """A tiny PNG file that decodes to ``pixels`` pixels (1-bit, all black)."""
    from PIL import Image

    width = 20000
    Image.new("1", (width, pixels // width)).save(path, format="PNG")
    return path


def test_decompression_bomb_is_a_problem(tmp_path):
    ddir = split_tree(tmp_path, "dtd")
    bomb = decompression_bomb(os.path.join(ddir, "images", "class_0", "test_0.jpg"), 200_000_000)
    assert os.path.getsize(bomb) < 100_000
    code, out, err = check("--root", tmp_path, "--full", "dtd")
    assert code == 1 and "Traceback" not in err
    assert f"{bomb} (cannot be decoded: DecompressionBombError: Image size (200000000 pixels) exceeds limit" in out
    # below twice the limit PIL only warns, and would decode it: a problem all the same
    decompression_bomb(bomb, 100_000_000)
    code, out, err = check("--root", tmp_path, "--full", "dtd")
    assert code == 1 and f"{bomb} (cannot be decoded: DecompressionBombWarning: Image size (100000000" in out
