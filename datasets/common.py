"""The one shared implementation of split reading, few-shot caching and base/new subsampling.

Every dataset module of this folder is a few lines of layout on top of the classes here. The
behaviour is CoOp's, byte for byte where it matters to other codebases:

- split files ``split_zhou_<Name>.json`` (``read_split``/``save_split`` as in CoOp's OxfordPets);
- few-shot caches ``split_fewshot/shot_<K>-seed_<S>.pkl`` holding
  ``pickle.dump({"train": train, "val": val}, f, protocol=pickle.HIGHEST_PROTOCOL)`` with lists of
  Dassl ``Datum`` (ImageNet: ``{"train": train}``, as CoOp), sampled with Dassl's own
  ``DatasetBase.generate_fewshot_dataset`` in CoOp's order (train with K shots, then val with
  min(K, 4)), so the same seed gives the same files as every other repository;
- ``subsample_classes``: labels sorted, base = first ceil(n/2), new = the rest, relabelled from 0.

On top of CoOp it checks what CoOp silently gets wrong and raises :class:`DatasetError` with a fix:
missing folders/split files, malformed split files, listed images that are missing, K larger than
the images of a class, and few-shot caches whose paths point outside the current ``$DATA`` (copied
from another machine: they are remapped to the current root when the files exist there).
"""

import logging
import math
import os
import pickle
from typing import List, Optional, Sequence

from dassl.data.datasets import Datum, DatasetBase
from dassl.utils import listdir_nohidden

from spotlighter import datum_pickle
from spotlighter.fileio import atomic_path

# train.py routes the root logger to the stdout Dassl tees into log.txt: what users must see lands there
logger = logging.getLogger(__name__)

from spotlighter.data_layout import (
    ALLOW_OUTSIDE_KEY,
    DOC,
    Confinement,
    VARIANT_IGNORED,
    DatasetError,
    Layout,
    check_images,
    get_layout,
    read_classnames,
    read_split_entries,
    require_dir,
    require_file,
    resolve_root,
)

SUBSAMPLE_CHOICES = ("all", "base", "new")
VAL_SHOTS = 4  # validation shots = min(K, 4)
# Set to 1 to let K-shot sampling use all images of a class that has fewer than K (CoOp's silent
# behaviour) with a warning, instead of stopping with an error.
ALLOW_FEWER_SHOTS_ENV = "SPOTLIGHTER_ALLOW_FEWER_SHOTS"
# What deleting a cached pickle does (said in every error about one).
FEWSHOT_REGENERATE = "it is re-created from the split file; the same seed gives the same sample"
PREPROCESSED_REGENERATE = "it is re-created from images/ and classnames.txt"


# --------------------------------------------------------------------------------------------
# Pure functions (no dataset object needed)
# --------------------------------------------------------------------------------------------
def make_datum(impath, label, classname, domain=0):
    return Datum(impath=impath, label=int(label), domain=domain, classname=classname)


def subsample_classes(*args, subsample="all"):
    """CoOp's ``OxfordPets.subsample_classes``: split the classes of ``args[0]`` into base (first
    ceil(n/2) sorted labels) and new (the rest), keep those items of every list in ``args`` and
    relabel them from 0."""
    if subsample not in SUBSAMPLE_CHOICES:
        raise DatasetError(
            f"DATASET.SUBSAMPLE_CLASSES is '{subsample}'; valid values: {', '.join(SUBSAMPLE_CHOICES)}"
        )
    if subsample == "all":
        return args
    labels = sorted({item.label for item in args[0]})
    m = math.ceil(len(labels) / 2)
    logger.info(f"SUBSAMPLE {subsample.upper()} CLASSES!")
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {y: y_new for y_new, y in enumerate(selected)}
    output = []
    for dataset in args:
        output.append([
            Datum(impath=item.impath, label=relabeler[item.label], classname=item.classname)
            for item in dataset
            if item.label in relabeler
        ])
    return output


def items_from_entries(entries, path_prefix):
    return [make_datum(os.path.join(path_prefix, relpath), label, classname)
            for relpath, label, classname in entries]


def read_split(filepath, path_prefix, doc=DOC, check=True, fix=None, confine=None):
    """CoOp's ``OxfordPets.read_split`` with validation: returns (train, val, test) Datum lists.
    ``fix``: the advice for a broken split or missing images (default: re-download/re-extract).
    ``confine``: a :class:`Confinement` every listed image must satisfy (None: no check)."""
    logger.info(f"Reading split from {filepath}")
    split = read_split_entries(filepath, doc=doc, fix=fix)
    out = []
    for key in ("train", "val", "test"):
        if confine is not None:
            confine.check(((f"entry {i} of key '{key}'", e[0], os.path.join(path_prefix, e[0]))
                           for i, e in enumerate(split[key])), f"split file {filepath}")
        if check:
            check_images([os.path.join(path_prefix, e[0]) for e in split[key]],
                         f"{key} split of {filepath}", doc=doc, fix=fix and f"The images do not match the list: {fix}")
        out.append(items_from_entries(split[key], path_prefix))
    return tuple(out)


def save_split(train, val, test, filepath, path_prefix):
    """CoOp's ``OxfordPets.save_split`` (paths stored relative to ``path_prefix``)."""
    import json

    def _extract(items):
        out = []
        for item in items:
            impath = item.impath.replace(path_prefix, "")
            if impath.startswith("/"):
                impath = impath[1:]
            out.append((impath, item.label, item.classname))
        return out

    split = {"train": _extract(train), "val": _extract(val), "test": _extract(test)}
    with open(filepath, "w") as f:
        json.dump(split, f, indent=4, separators=(",", ": "))
    logger.info(f"Saved split to {filepath}")


def atomic_pickle(obj, path):
    """``pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)`` written atomically (a run killed
    mid-write, or two runs writing the same cache, never leave a truncated file)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def _remap_prefix(impath: str, dataset_dir: str) -> Optional[str]:
    """Old dataset folder inside ``impath`` (a path from another machine): the longest prefix that
    ends with a component named like the current dataset folder and under which the rest of the
    path exists in ``dataset_dir``. None if there is none."""
    name = os.path.basename(dataset_dir.rstrip(os.sep))
    parts = impath.split("/")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] != name:
            continue
        old = "/".join(parts[: i + 1])
        if os.path.exists(dataset_dir + impath[len(old):]):
            return old
    return None


def localize_items(groups: dict, dataset_dir: str, source: str, doc: str = DOC,
                   confine: Optional[Confinement] = None) -> dict:
    """Make the Datum lists of a pickled cache (``{"train": [...], ...}``) point into
    ``dataset_dir``. A cache written on another machine (or under another ``$DATA``) holds absolute
    paths outside it: if the same files exist under the current dataset folder the paths are
    remapped (with a warning), otherwise a DatasetError says which file to delete. ``confine``: a
    :class:`Confinement` every (remapped) path must satisfy; None: paths outside are allowed
    (``DATASET.ALLOW_OUTSIDE_PATHS``) when they can be neither remapped nor found."""
    out = _localize(groups, dataset_dir, source, confine is None)
    if confine is not None:
        for key, items in out.items():
            confine.check(((f"item {i} of '{key}'", it.impath, it.impath) for i, it in enumerate(items)),
                          source)
    return out


def _localize(groups: dict, dataset_dir: str, source: str, allow_outside: bool) -> dict:
    prefix = dataset_dir.rstrip(os.sep) + os.sep
    foreign = [it.impath for items in groups.values() for it in items if not it.impath.startswith(prefix)]
    if not foreign:
        return groups
    old = _remap_prefix(foreign[0], dataset_dir)
    if old is None or any(not p.startswith(old + "/") for p in foreign):
        if allow_outside and all(os.path.isfile(p) for p in foreign):
            return groups  # DATASET.ALLOW_OUTSIDE_PATHS: the listed images are used where they are
        raise DatasetError(
            f"{source} lists images outside the current dataset folder {dataset_dir} "
            f"(e.g. {foreign[0]}); it was probably copied from another machine or made with another "
            f"$DATA, and its images cannot be found under {dataset_dir}. Delete {source} (it is "
            f"re-created from the split file; the same seed gives the same sample), or pass the "
            f"--root it was made with"
        )
    new = dataset_dir.rstrip(os.sep)
    logger.warning(
        f"{source} was written under {old}; its image paths are remapped to {new} for this run "
        f"(the file is left unchanged; delete it to re-create it with local paths)"
    )
    out = {}
    for key, items in groups.items():
        remapped = []
        for it in items:
            if not it.impath.startswith(prefix):
                path = new + it.impath[len(old):]
                if not os.path.isfile(path):
                    raise DatasetError(
                        f"{source} lists {it.impath}, remapped to the current $DATA as {path}, "
                        f"which does not exist: delete {source} so that it is re-created"
                    )
                it = Datum(impath=path, label=it.label, domain=it.domain, classname=it.classname)
            remapped.append(it)
        out[key] = remapped
    return out


def load_datum_pickle(path: str, keys: Sequence[str], dataset_dir: str, doc: str = DOC,
                      regenerate: str = "it is re-created", confine: Optional[Confinement] = None) -> dict:
    """Load a pickled ``{key: [Datum, ...]}`` file (few-shot cache, ImageNet's preprocessed.pkl)
    with the restricted unpickler (a crafted file cannot run code), check its keys and items, and
    make its paths point into ``dataset_dir`` (and satisfy ``confine``, unless None). ``regenerate``
    says what deleting the file does."""
    fix = f"delete it ({regenerate})"
    try:
        data = datum_pickle.load(path, Datum)
    except datum_pickle.UnsafePickleError as e:
        raise DatasetError(f"{path} is not a file of Dassl Datum objects: {e}. If you did not put it "
                           f"there, check who can write to this $DATA; {fix}") from None
    except Exception as e:  # truncated, other pickle protocol, unreadable
        raise DatasetError(f"cannot read {path} ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path} holds a {type(data).__name__}, expected a dict with keys "
                           f"{list(keys)}; {fix}")
    groups = {}
    for key in keys:
        if key not in data:
            raise DatasetError(f"{path} has no key '{key}' (keys: {sorted(map(str, data))}); {fix}")
        items = data[key]
        if not isinstance(items, list):
            raise DatasetError(f"{path}: '{key}' is a {type(items).__name__}, not a list of Dassl "
                               f"Datum objects; {fix}")
        problem = next((p for p in (datum_pickle.datum_problem(it, Datum) for it in items) if p), None)
        if problem:
            raise DatasetError(f"{path}: '{key}' is not a list of Dassl Datum objects ({problem}); {fix}")
        groups[key] = items
    return localize_items(groups, dataset_dir, path, doc=doc, confine=confine)


def check_unique_classnames(groups, dataset: str, source: str) -> None:
    """Raise a DatasetError when two labels of the Datum lists ``groups`` share a class name (the
    prompts, and Spotlighter's class memory, are keyed by class name: such classes get one prompt
    and each other's prototypes). ``source``: the file the names come from."""
    labels_of = {}
    for items in groups:
        for it in items:
            labels_of.setdefault(it.classname, set()).add(it.label)
    dups = sorted((name, sorted(labs)) for name, labs in labels_of.items() if len(labs) > 1)
    if dups:
        listed = "; ".join(f"'{name}' is the name of labels {', '.join(map(str, labs))}" for name, labs in dups[:5])
        more = f"; and {len(dups) - 5} more" if len(dups) > 5 else ""
        raise DatasetError(
            f"{dataset}: {len(dups)} class name(s) are shared by different classes in {source}: {listed}{more}. "
            "Each class needs its own name (the prompts and Spotlighter's class memory are keyed by class "
            "name): rename them"
        )


def count_by_class(items):
    counts = {}
    names = {}
    for it in items:
        counts[it.label] = counts.get(it.label, 0) + 1
        names.setdefault(it.label, it.classname)
    return counts, names


def check_shots(items, num_shots, what, strict, doc=DOC):
    """Report classes with fewer than ``num_shots`` images (Dassl then silently takes them all)."""
    counts, names = count_by_class(items)
    short = sorted((n, lab) for lab, n in counts.items() if n < num_shots)
    if not short:
        return
    listed = ", ".join(f"'{names[lab]}' (label {lab}) has {n}" for n, lab in short[:5])
    more = f", and {len(short) - 5} more classes" if len(short) > 5 else ""
    msg = (f"{what}: {num_shots} shots requested but {len(short)} class(es) have fewer images: "
           f"{listed}{more}")
    if strict and os.environ.get(ALLOW_FEWER_SHOTS_ENV, "") not in ("1", "true", "yes"):
        raise DatasetError(
            f"{msg}. Use at most {short[0][0]} shots (DATASET.NUM_SHOTS), or set "
            f"{ALLOW_FEWER_SHOTS_ENV}=1 to use all images of those classes (CoOp's behaviour)"
        )
    logger.warning(msg + "; all their images are used")


# --------------------------------------------------------------------------------------------
# Base classes
# --------------------------------------------------------------------------------------------
class CoOpDataset(DatasetBase):
    """A Dassl dataset laid out as in CoOp's DATASETS.md. Subclasses set ``layout_key`` and
    implement ``read_data()`` returning (train, val, test) Datum lists; this class does the rest:
    few-shot cache, base/new subsampling. The static methods are CoOp's ``OxfordPets`` API."""

    layout_key = ""
    # ImageNet's few-shot cache holds only "train" (val = test), as in CoOp.
    fewshot_keys = ("train", "val")

    read_split = staticmethod(read_split)
    save_split = staticmethod(save_split)
    subsample_classes = staticmethod(subsample_classes)

    def __init__(self, cfg):
        self.layout: Layout = get_layout(self.layout_key)
        self.root = resolve_root(cfg.DATASET.ROOT)
        self.dataset_dir = self.locate(self.layout.path(self.root))
        self.image_dir = os.path.join(self.dataset_dir, self.layout.image_dir) \
            if self.layout.image_dir else self.dataset_dir
        self.split_fewshot_dir = os.path.join(self.dataset_dir, "split_fewshot")

        # DATASET.ALLOW_OUTSIDE_PATHS (spotlighter/config.py): image paths may lead out of dataset_dir
        self.allow_outside = bool(cfg.DATASET.get("ALLOW_OUTSIDE_PATHS", False))
        subsample = cfg.DATASET.SUBSAMPLE_CLASSES if "SUBSAMPLE_CLASSES" in cfg.DATASET else "all"
        if subsample not in SUBSAMPLE_CHOICES:  # fail before any work
            subsample_classes([], subsample=subsample)

        train, val, test = self.read_data()
        check_unique_classnames((train, val, test), self.layout.name,
                                getattr(self, "names_source", None) or getattr(self, "split_path", None)
                                or self.dataset_dir)
        num_shots = int(cfg.DATASET.NUM_SHOTS)
        if num_shots >= 1:
            train, val = self.fewshot(train, val, num_shots, cfg.SEED)
        train, val, test = subsample_classes(train, val, test, subsample=subsample)
        super().__init__(train_x=train, val=val, test=test)

    # -- layout ------------------------------------------------------------------------------
    def confinement(self, follow_files: bool = True) -> Optional[Confinement]:
        """What keeps the listed images inside the dataset folder (None: DATASET.ALLOW_OUTSIDE_PATHS)."""
        if self.allow_outside:
            return None
        return Confinement(self.dataset_dir, self.image_dir, follow_files=follow_files)

    def locate(self, dataset_dir):
        """The dataset folder; error naming the expected path and the DATASETS.md section."""
        return require_dir(dataset_dir, self.layout, "dataset folder")

    def read_data(self):
        raise NotImplementedError

    # -- few-shot ----------------------------------------------------------------------------
    def fewshot_path(self, num_shots, seed):
        return os.path.join(self.split_fewshot_dir, f"shot_{num_shots}-seed_{seed}.pkl")

    def fewshot(self, train, val, num_shots, seed):
        """Load ``split_fewshot/shot_<K>-seed_<S>.pkl`` or create it exactly as CoOp does."""
        path = self.fewshot_path(num_shots, seed)
        if os.path.exists(path):
            logger.info(f"Loading preprocessed few-shot data from {path}")
            data = load_datum_pickle(path, self.fewshot_keys, self.dataset_dir, doc=self.layout.doc,
                                     regenerate=FEWSHOT_REGENERATE, confine=self.confinement())
            check_images([it.impath for key in self.fewshot_keys for it in data[key]],
                         f"{self.layout.name} few-shot cache {path}", doc=self.layout.doc,
                         fix=f"restore the images, or delete {path} so that it is re-created")
            return data["train"], (data["val"] if "val" in self.fewshot_keys else val)

        check_shots(train, num_shots, f"{self.layout.name} train split", strict=True,
                    doc=self.layout.doc)
        train = self.generate_fewshot_dataset(train, num_shots=num_shots)
        check_images([it.impath for it in train], f"{self.layout.name} {num_shots}-shot train set",
                     doc=self.layout.doc)
        data = {"train": train}
        if "val" in self.fewshot_keys:
            val_shots = min(num_shots, VAL_SHOTS)
            check_shots(val, val_shots, f"{self.layout.name} val split", strict=False)
            val = self.generate_fewshot_dataset(val, num_shots=val_shots)
            data["val"] = val
        logger.info(f"Saving preprocessed few-shot data to {path}")
        try:
            atomic_pickle(data, path)
        except OSError as e:
            logger.warning(f"could not write the few-shot cache {path} ({e}); continuing without it")
        return train, val


class SplitJsonDataset(CoOpDataset):
    """Datasets read from ``split_zhou_<Name>.json`` (paths relative to the image folder)."""

    def read_data(self):
        split_path = os.path.join(self.dataset_dir, self.layout.split_file)
        self.split_path = split_path
        if not os.path.isfile(split_path):
            raise DatasetError(
                f"{self.layout.name}: split file {split_path} is missing. Download "
                f"{self.layout.split_file} as described in {self.layout.doc}"
            )
        require_dir(self.image_dir, self.layout, "image folder")
        return read_split(split_path, self.image_dir, doc=self.layout.doc, confine=self.confinement())


class ImageNetFolderDataset(CoOpDataset):
    """ImageNet: ``images/train|val/<wnid>/`` and ``classnames.txt``; the parsed lists are cached in
    ``preprocessed.pkl`` (CoOp's file); the val set is the test set and the validation set."""

    fewshot_keys = ("train",)  # CoOp's ImageNet cache: {"train": train}

    def read_data(self):
        self.preprocessed = os.path.join(self.dataset_dir, "preprocessed.pkl")
        if os.path.exists(self.preprocessed):
            # 1.3M images: the folders are resolved, not each file
            data = load_datum_pickle(self.preprocessed, ("train", "test"), self.dataset_dir,
                                     doc=self.layout.doc, regenerate=PREPROCESSED_REGENERATE,
                                     confine=self.confinement(follow_files=False))
            train, test = data["train"], data["test"]
        else:
            text_file = require_file(os.path.join(self.dataset_dir, "classnames.txt"), self.layout)
            self.names_source = text_file
            classnames = read_classnames(text_file)
            train = self.read_folders(classnames, "train")
            test = self.read_folders(classnames, "val")
            try:
                atomic_pickle({"train": train, "test": test}, self.preprocessed)
            except OSError as e:
                logger.warning(f"could not write {self.preprocessed} ({e}); continuing without it")
        check_images([it.impath for it in test], f"{self.layout.name} test set (images/val)",
                     doc=self.layout.doc)
        return train, test, test  # CoOp: the val folder is both the validation and the test set

    def read_folders(self, classnames, split):
        split_dir = require_dir(os.path.join(self.image_dir, split), self.layout, "image folder")
        folders = sorted(f.name for f in os.scandir(split_dir) if f.is_dir())
        unknown = [f for f in folders if f not in classnames]
        if unknown:
            raise DatasetError(
                f"{self.layout.name}: {len(unknown)} folder(s) of {split_dir} are not in "
                f"{os.path.join(self.dataset_dir, 'classnames.txt')}, e.g. {unknown[:3]}. Use the "
                f"classnames.txt linked in {self.layout.doc}"
            )
        items = []
        for label, folder in enumerate(folders):
            for imname in listdir_nohidden(os.path.join(split_dir, folder)):
                items.append(make_datum(os.path.join(split_dir, folder, imname), label,
                                        classnames[folder]))
        return items


class ImageNetVariantDataset(DatasetBase):
    """ImageNetV2/Sketch/A/R: test-only datasets of class folders named by ImageNet wnid (V2: by
    ImageNet label), class names from the variant's own ``classnames.txt`` (a copy of ImageNet's, as
    CoOp asks), falling back to ``$DATA/imagenet/classnames.txt``. NUM_SHOTS and
    SUBSAMPLE_CLASSES do not apply (as in CoOp)."""

    layout_key = ""
    label_folders = False  # ImageNetV2: folders are named 0..999

    def __init__(self, cfg):
        self.layout: Layout = get_layout(self.layout_key)
        self.root = resolve_root(cfg.DATASET.ROOT)
        self.dataset_dir = require_dir(self.layout.path(self.root), self.layout, "dataset folder")
        self.image_dir = require_dir(os.path.join(self.dataset_dir, self.layout.image_dir),
                                     self.layout, "image folder")
        names_file = self.classnames_file()
        classnames = read_classnames(names_file)
        data = self.read_data(classnames)
        if not data:
            raise DatasetError(f"{self.layout.name}: no images found under {self.image_dir} "
                               f"(see {self.layout.doc})")
        check_unique_classnames((data,), self.layout.name, names_file)
        super().__init__(train_x=data, test=data)

    def classnames_file(self):
        own = os.path.join(self.dataset_dir, "classnames.txt")
        if os.path.isfile(own):
            return own
        shared = os.path.join(self.root, "imagenet", "classnames.txt")
        if os.path.isfile(shared):
            logger.info(f"{own} is missing; using {shared}")
            return shared
        raise DatasetError(
            f"{self.layout.name}: {own} is missing: copy ImageNet's classnames.txt there "
            f"(see {self.layout.doc})"
        )

    def read_data(self, classnames):
        items = []
        if self.label_folders:
            folders = list(classnames.keys())
            for label in range(len(folders)):
                class_dir = os.path.join(self.image_dir, str(label))
                if not os.path.isdir(class_dir):
                    raise DatasetError(f"{self.layout.name}: class folder {class_dir} is missing "
                                       f"(see {self.layout.doc})")
                for imname in listdir_nohidden(class_dir):
                    items.append(make_datum(os.path.join(class_dir, imname), label,
                                            classnames[folders[label]]))
            return items
        folders = [f for f in listdir_nohidden(self.image_dir, sort=True) if f not in VARIANT_IGNORED]
        unknown = [f for f in folders if f not in classnames]
        if unknown:
            raise DatasetError(
                f"{self.layout.name}: folder(s) {unknown[:3]} of {self.image_dir} are not in the "
                f"classnames.txt; copy ImageNet's classnames.txt (see {self.layout.doc})"
            )
        for label, folder in enumerate(folders):
            for imname in listdir_nohidden(os.path.join(self.image_dir, folder)):
                items.append(make_datum(os.path.join(self.image_dir, folder, imname), label,
                                        classnames[folder]))
        return items
