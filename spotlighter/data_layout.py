"""Where every dataset lives under ``$DATA``, and the file-level checks shared by everything.

The one table of datasets (``LAYOUTS``: key, registered name, folder, image folder, split file,
DATASETS.md section). Free of Dassl and of torch: the registry (``spotlighter.registry``, hence the
protocol runner and the results tool), ``scripts/check_data.py`` (on a machine without Dassl) and the
Dassl dataset classes of ``datasets/`` (``common.py`` and one module per dataset) import it. The layout is
the one of CoOp's DATASETS.md (same folder names, split files ``split_zhou_<Name>.json``), so a
``$DATA`` folder prepared for CoOp, CoCoOp, MaPLe, PromptSRC or KgCoOp works unchanged.

Everything that can go wrong with the data raises :class:`DatasetError`, whose message says what is
wrong (which file, which key, which class) and what to do about it.
"""

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

DOC = "DATASETS.md"


class DatasetError(RuntimeError):
    """A dataset cannot be built from the files under ``$DATA``; the message says how to fix it.

    ``train.py`` prints the message without a traceback.
    """


@dataclass(frozen=True)
class Layout:
    key: str  # config name: configs/datasets/<key>.yaml
    name: str  # registered Dassl name (DATASET.NAME)
    folder: str  # folder under $DATA
    image_dir: str  # image folder, relative to the dataset folder ("" = the dataset folder)
    kind: str  # "split" | "imagenet" | "fgvc" | "imagenet_variant" | "generated"
    section: str  # anchor of its section in DATASETS.md
    split_file: Optional[str] = None  # split_zhou_<Name>.json for split-json datasets

    @property
    def doc(self) -> str:
        return f"{DOC}#{self.section}"

    def path(self, root: str) -> str:
        return os.path.join(root, self.folder)


def _split(key, name, folder, image_dir, section):
    return Layout(key, name, folder, image_dir, "split", section, split_file=f"split_zhou_{name}.json")


def _variant(key, name, folder, image_dir, section):
    return Layout(key, name, folder, image_dir, "imagenet_variant", section)


def _generated(key, name):  # generated on first use by spotlighter.benchmark.data.ensure(folder, key)
    return Layout(key, name, key, "images", "generated", "minibench", split_file=f"split_zhou_{name}.json")


GENERATED_FIX = ("regenerate it: delete the folder {folder} (it is generated again on first use) or run "
                 "`python -m spotlighter.benchmark prepare --root {root}`")


def regenerate_hint(lay: "Layout", root: str) -> str:
    """What to do about a broken file of a generated dataset (there is nothing to re-download)."""
    return GENERATED_FIX.format(folder=lay.path(root), root=root)


LAYOUTS: "OrderedDict[str, Layout]" = OrderedDict(
    (lay.key, lay)
    for lay in [
        Layout("imagenet", "ImageNet", "imagenet", "images", "imagenet", "imagenet"),
        _split("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", "caltech101"),
        _split("oxford_pets", "OxfordPets", "oxford_pets", "images", "oxfordpets"),
        _split("stanford_cars", "StanfordCars", "stanford_cars", "", "stanfordcars"),
        _split("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", "flowers102"),
        _split("food101", "Food101", "food-101", "images", "food101"),
        Layout("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "images", "fgvc", "fgvcaircraft"),
        _split("sun397", "SUN397", "sun397", "SUN397", "sun397"),
        _split("dtd", "DescribableTextures", "dtd", "images", "dtd"),
        _split("eurosat", "EuroSAT", "eurosat", "2750", "eurosat"),
        _split("ucf101", "UCF101", "ucf101", "UCF-101-midframes", "ucf101"),
        _variant("imagenetv2", "ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val",
                 "imagenetv2"),
        _variant("imagenet_sketch", "ImageNetSketch", "imagenet-sketch", "images", "imagenet-sketch"),
        _variant("imagenet_a", "ImageNetA", "imagenet-adversarial", "imagenet-a", "imagenet-a"),
        _variant("imagenet_r", "ImageNetR", "imagenet-rendition", "imagenet-r", "imagenet-r"),
        _generated("minibench", "MiniBench"),
        # MiniBench's cross-dataset targets (own vocabularies) and domain-generalisation targets
        # (MiniBench's classes in shifted domains, test-only): spotlighter.benchmark.data.SPECS.
        _generated("minibench_glyphs", "MiniBenchGlyphs"),
        _generated("minibench_textures", "MiniBenchTextures"),
        _generated("minibench_objects", "MiniBenchObjects"),
        _generated("minibench_sketch", "MiniBenchSketch"),
        _generated("minibench_noise", "MiniBenchNoise"),
        _generated("minibench_palette", "MiniBenchPalette"),
    ]
)
GENERATED = [k for k in LAYOUTS if LAYOUTS[k].kind == "generated"]

BY_NAME: Dict[str, Layout] = {lay.name: lay for lay in LAYOUTS.values()}

# Files of ImageNet variants that are not class folders (CoOp ignores the same).
VARIANT_IGNORED = ("README.txt",)
# FGVCAircraft image names in images_variant_*.txt have no extension.
FGVC_EXT = ".jpg"


def get_layout(key_or_name: str) -> Layout:
    if key_or_name in LAYOUTS:
        return LAYOUTS[key_or_name]
    if key_or_name in BY_NAME:
        return BY_NAME[key_or_name]
    raise DatasetError(
        f"unknown dataset '{key_or_name}'. Valid datasets: {', '.join(LAYOUTS)} "
        f"(registered names: {', '.join(BY_NAME)})"
    )


def resolve_root(root: str) -> str:
    """``$DATA`` as CoOp resolves it (abspath + expanduser, no symlink resolution)."""
    if not root or not str(root).strip():
        raise DatasetError(
            "the dataset root is empty: pass --root $DATA (the folder that holds all datasets, "
            f"see {DOC}) or set DATASET.ROOT"
        )
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise DatasetError(f"the dataset root {root} does not exist or is not a folder (see {DOC})")
    return root


def require_dir(path: str, lay: Layout, what: str = "folder") -> str:
    if not os.path.isdir(path):
        raise DatasetError(
            f"{lay.name}: expected {what} {path} is missing. Prepare it as described in {lay.doc}"
        )
    return path


def require_file(path: str, lay: Layout, what: str = "file") -> str:
    if not os.path.isfile(path):
        raise DatasetError(
            f"{lay.name}: expected {what} {path} is missing. Prepare it as described in {lay.doc}"
        )
    return path


# --------------------------------------------------------------------------------------------
# Split files (CoOp format): {"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}
# --------------------------------------------------------------------------------------------
SPLIT_KEYS = ("train", "val", "test")


def read_split_entries(filepath: str, doc: str = DOC, fix: Optional[str] = None
                       ) -> Dict[str, List[Tuple[str, int, str]]]:
    """Read and validate a CoOp split json; return ``{split: [(relpath, label, classname), ...]}``.

    ``fix``: what to tell the user to do about a broken file (default: re-download it).
    """
    fix = fix or f"re-download it (see {doc})"
    if not os.path.isfile(filepath):
        raise DatasetError(f"split file {filepath} is missing: download it as described in {doc}")
    try:
        with open(filepath, "r") as f:
            split = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"split file {filepath} is not valid JSON ({e}): {fix}") from None
    except OSError as e:
        raise DatasetError(f"split file {filepath} cannot be read ({e})") from None
    if not isinstance(split, dict):
        raise DatasetError(f"split file {filepath}: expected a JSON object with keys "
                           f"{list(SPLIT_KEYS)}, got {type(split).__name__}: {fix}")
    out = {}
    for key in SPLIT_KEYS:
        if key not in split:
            raise DatasetError(f"split file {filepath} has no key '{key}' (expected keys "
                               f"{list(SPLIT_KEYS)}): {fix}")
        items = split[key]
        if not isinstance(items, list) or not items:
            raise DatasetError(f"split file {filepath}: key '{key}' must be a non-empty list of "
                               f"[relative path, label, class name]: {fix}")
        entries = []
        for i, entry in enumerate(items):
            ok = isinstance(entry, (list, tuple)) and len(entry) == 3
            if ok:
                relpath, label, classname = entry
                ok = isinstance(relpath, str) and isinstance(classname, str)
                try:
                    label = int(label)
                except (TypeError, ValueError):
                    ok = False
            if not ok:
                raise DatasetError(
                    f"split file {filepath}: entry {i} of key '{key}' is {entry!r}, expected "
                    f"[relative path, label, class name]: {fix}"
                )
            entries.append((relpath, label, classname))
        out[key] = entries
    return out


# --------------------------------------------------------------------------------------------
# Image paths stay inside the dataset folder
# --------------------------------------------------------------------------------------------
ALLOW_OUTSIDE_KEY = "DATASET.ALLOW_OUTSIDE_PATHS"
OUTSIDE_FIX = (f"Image paths must stay inside the dataset folder: correct or re-create the file, or set "
               f"{ALLOW_OUTSIDE_KEY} True if its images are meant to lie elsewhere")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class Confinement:
    """Says whether image paths stay inside ``folders`` (the dataset folder and its image folder).

    A path is outside when it is absolute elsewhere or climbs out with ``..`` (checked on the path
    as written), or when a symlink on the way leads out (checked on the resolved path: a dataset
    or image folder that is itself a symlink, e.g. to a larger disk, is fine). ``follow_files``:
    also resolve each file (one ``lstat`` per image; off for very long lists, where only the
    folders are resolved)."""

    def __init__(self, *folders: str, follow_files: bool = True):
        self.folders = [os.path.normpath(os.path.abspath(f)) for f in folders if f]
        self.real = [os.path.realpath(f) for f in self.folders]
        self.follow_files = follow_files
        self._prefixes = tuple(f.rstrip(os.sep) + os.sep for f in self.folders)
        self._real_dirs: Dict[str, Tuple[str, bool]] = {}  # folder -> (resolved, inside)

    @property
    def where(self) -> str:
        return self.folders[0]

    def problem(self, path: str) -> Optional[str]:
        """None when ``path`` is inside, else why not (in words). About 1 µs per path in the
        common case (a plain path under a folder already seen; plus an ``lstat`` with follow_files)."""
        norm = path
        if "/." in path or "//" in path or not path.startswith(self._prefixes):  # may need normalising
            norm = os.path.normpath(path)
            if not any(_inside(norm, f) for f in self.folders):
                how = "an absolute path" if not any(part == ".." for part in path.split(os.sep)) else "'..' leads"
                return f"{how} outside the dataset folder {self.where}"
        folder, _, name = norm.rpartition(os.sep)
        known = self._real_dirs.get(folder)
        if known is None:
            real_dir = os.path.realpath(folder)
            known = self._real_dirs[folder] = (real_dir, any(_inside(real_dir, f) for f in self.real))
        real_dir, inside = known
        real = None if inside else os.path.join(real_dir, name)
        if self.follow_files and os.path.islink(norm):
            real = os.path.realpath(norm)
            inside = any(_inside(real, f) for f in self.real)
        if not inside:
            return f"a symlink leads to {real}, outside the dataset folder {self.where}"
        return None

    def check(self, items, source: str) -> None:
        """Raise a DatasetError for the first ``(entry, written, path)`` of ``items`` that is outside:
        ``entry`` says where it is listed (e.g. "entry 3 of 'train'"), ``written`` how."""
        for entry, written, path in items:
            why = self.problem(path)
            if why is not None:
                raise DatasetError(f"{source}: {entry} is {written!r}: {why}. {OUTSIDE_FIX}")


def read_classnames(text_file: str) -> "OrderedDict[str, str]":
    """ImageNet's classnames.txt: lines ``<folder> <class name>`` (CoOp's ImageNet.read_classnames)."""
    classnames = OrderedDict()
    with open(text_file, "r") as f:
        for line in f.readlines():
            line = line.strip().split(" ")
            if not line or not line[0]:
                continue
            classnames[line[0]] = " ".join(line[1:])
    return classnames


def image_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a usable image file (cheap os-level checks), or None."""
    if not os.path.exists(path):
        return "missing"
    if not os.path.isfile(path):
        return "not a file"
    if not os.access(path, os.R_OK):
        return "not readable"
    if os.path.getsize(path) == 0:
        return "empty"
    return None


def check_images(paths: Sequence[str], what: str, doc: str = DOC, show: int = 5,
                 fix: Optional[str] = None) -> None:
    """Raise a DatasetError naming the first few listed images that are missing or unreadable."""
    bad = []
    seen = set()
    for p in paths:
        if p in seen:
            continue
        seen.add(p)
        why = image_problem(p)
        if why is not None:
            bad.append((p, why))
    if bad:
        lines = "\n".join(f"  {p} ({why})" for p, why in bad[:show])
        more = f"\n  ... and {len(bad) - show} more" if len(bad) > show else ""
        raise DatasetError(
            f"{what}: {len(bad)} listed image(s) are missing or unreadable, e.g.\n{lines}{more}\n"
            + (fix or f"The images do not match the list: re-extract them as described in {doc}")
        )
