#!/usr/bin/env python
"""Check a $DATA folder against the layout of DATASETS.md and say what is missing.

    python scripts/check_data.py --root $DATA                 # every dataset
    python scripts/check_data.py --root $DATA dtd eurosat     # some of them
    python scripts/check_data.py --root $DATA --full dtd      # decode every image
    python scripts/check_data.py --root $DATA --quick imagenet  # skip per-image checks
    python scripts/check_data.py --root $DATA --protocol xd     # what a protocol needs (SOURCE=...)

For each dataset it checks the folder, the split file (valid JSON with train/val/test lists of
[relative path, label, class name]) or the files the dataset reads instead (ImageNet's
classnames.txt and images/train|val, FGVCAircraft's variants.txt and images_variant_*.txt), that
every listed image exists, and that the few-shot caches in split_fewshot/ (and ImageNet's
preprocessed.pkl) hold only Dassl Datum objects (read without running code) pointing into this
$DATA. Every listed image must lie inside its dataset folder (no absolute paths elsewhere, no '..'
or symlink leading out), as training requires unless DATASET.ALLOW_OUTSIDE_PATHS is True
(--allow-outside-paths here). It decodes, in parallel, every image of the few-shot caches and a random sample of each
split (--sample per split; --full: every image), as training would.
Exit status: 0 when every checked dataset is usable, 1 otherwise, 2 on bad arguments.
Needs neither Dassl nor torch.
"""

import argparse
import glob
import os
import random
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # this checkout's spotlighter package (plain Python parts only)
    sys.path.insert(0, REPO)

from spotlighter import data_layout as L  # noqa: E402
from spotlighter import datum_pickle  # noqa: E402
from spotlighter import registry as R  # noqa: E402


SHOW = 3
#: Images decoded per split by default (plus every image of the few-shot caches).
DEFAULT_SAMPLE = 32
#: Seed of that random sample (the same images on every run).
SAMPLE_SEED = 0
FEWSHOT_FIX = "delete it (it is re-created from the split file; the same seed gives the same sample)"
PREPROCESSED_FIX = "delete it (it is re-created from images/ and classnames.txt)"


def protocol_datasets(protocol, source):
    """The datasets of $DATA a protocol reads (the registry's table), in its order."""
    if protocol in ("base2new", "fewshot"):  # few-shot runs on the base-to-novel datasets (all classes)
        names = list(R.BASE2NEW_DATASETS)
    else:
        targets = R.xd_targets(source) if protocol == "xd" else R.dg_targets(source)
        names = ([source] if protocol == "xd" else []) + list(targets)
    return [n for n in names if n in L.LAYOUTS]


class _Datum:  # stands in for dassl's Datum when reading few-shot caches without Dassl
    def __setstate__(self, state):
        self.__dict__.update(state)

    @property
    def impath(self):
        return self.__dict__.get("_impath", "")


def decode_problem(path):
    """Why ``path`` cannot be decoded as training would (PIL, converted to RGB), or None. An image over
    PIL's decompression-bomb limit is a problem (training refuses it), not only a warning."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.convert("RGB")
    except Exception as e:  # UnidentifiedImageError, truncated data, decompression bombs ...
        return f"cannot be decoded: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def decode_images(paths, what, jobs):
    """[(path, why)] of ``paths`` that do not decode; parallel, with a progress bar on a terminal."""
    from PIL import Image
    from tqdm import tqdm

    warnings.simplefilter("error", Image.DecompressionBombWarning)  # see decode_problem (threads share it)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(tqdm(pool.map(decode_problem, paths), total=len(paths), desc=f"decoding {what}",
                            unit="img", file=sys.stderr, disable=None, leave=False))
    return [(p, why) for p, why in zip(paths, results) if why]


def missing_images(paths):
    bad = [(p, L.image_problem(p)) for p in paths]
    return [(p, why) for p, why in bad if why]


def describe_missing(bad, what, fix):
    ex = "; ".join(f"{p} ({why})" for p, why in bad[:SHOW])
    return f"{len(bad)} image(s) listed in {what} are missing or unreadable, e.g. {ex}. {fix}"


def outside_problems(confine, items, source):
    """[one line] when an ``(entry, written, path)`` of ``items`` leaves the dataset folder, else []."""
    if confine is None:
        return []
    try:
        confine.check(items, source)
    except L.DatasetError as e:
        return [str(e)]
    return []


def check_split(lay, ddir, quick, images, confine=None):
    problems, info = [], ""
    split_path = os.path.join(ddir, lay.split_file)
    idir = os.path.join(ddir, lay.image_dir) if lay.image_dir else ddir
    if not os.path.isfile(split_path):
        return [f"split file {split_path} is missing: download {lay.split_file}"], info
    if lay.image_dir and not os.path.isdir(idir):
        problems.append(f"image folder {idir} is missing")
    try:
        split = L.read_split_entries(split_path, doc=lay.doc)
    except L.DatasetError as e:
        return problems + [str(e)], info
    classes = {e[1] for e in split["train"]}
    info = (f"{len(classes)} classes, train/val/test {len(split['train'])}/{len(split['val'])}/"
            f"{len(split['test'])}")
    for key in ("train", "val", "test"):
        outside = outside_problems(confine, ((f"entry {i} of key '{key}'", e[0], os.path.join(idir, e[0]))
                                             for i, e in enumerate(split[key])), f"split file {split_path}")
        if outside:
            return problems + outside, info
    if not quick and not problems:
        for key in ("train", "val", "test"):
            paths = [os.path.join(idir, e[0]) for e in split[key]]
            bad = missing_images(paths)
            if bad:
                problems.append(describe_missing(bad, f"the {key} split", "Re-extract the images"))
            images[f"the {key} split"] = paths
    return problems, info


def check_imagenet(lay, ddir, quick, images, confine=None):
    problems = []
    cfile = os.path.join(ddir, "classnames.txt")
    classnames = L.read_classnames(cfile) if os.path.isfile(cfile) else None
    if classnames is None:
        problems.append(f"{cfile} is missing: download classnames.txt")
    counts = {}
    for split in ("train", "val"):
        d = os.path.join(ddir, "images", split)
        if not os.path.isdir(d):
            problems.append(f"image folder {d} is missing")
            continue
        folders = sorted(f.name for f in os.scandir(d) if f.is_dir())
        counts[split] = len(folders)
        if not quick:
            images[f"images/{split}"] = folder_images(d, folders)
        if not folders:
            problems.append(f"{d} has no class folders")
        if classnames is not None:
            unknown = [f for f in folders if f not in classnames]
            if unknown:
                problems.append(f"{len(unknown)} folder(s) of {d} are not in classnames.txt, e.g. {unknown[:SHOW]}")
    if counts and counts.get("train") != counts.get("val"):
        problems.append(f"images/train has {counts.get('train', 0)} class folders but images/val has "
                        f"{counts.get('val', 0)}")
    pre = os.path.join(ddir, "preprocessed.pkl")
    if os.path.isfile(pre):
        problems += check_pickle(pre, ddir, ("train", "test"), quick=True, fix=PREPROCESSED_FIX, confine=confine)
    info = f"{counts.get('train', 0)} classes" + ("" if counts.get("train") in (None, 1000) or not counts
                                                    else " (the benchmark uses all 1000)")
    return problems, info


def check_fgvc(lay, ddir, quick, images, confine=None):
    problems = []
    vfile = os.path.join(ddir, "variants.txt")
    if not os.path.isfile(vfile):
        return [f"{vfile} is missing: keep the data/ folder of fgvc-aircraft-2013b"], ""
    with open(vfile) as f:
        variants = [line.strip() for line in f if line.strip()]
    known = set(variants)
    idir = os.path.join(ddir, "images")
    if not os.path.isdir(idir):
        problems.append(f"image folder {idir} is missing")
    sizes = []
    for split in ("train", "val", "test"):
        path = os.path.join(ddir, f"images_variant_{split}.txt")
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
            continue
        paths = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                parts = line.strip().split(" ")
                if not parts[0]:
                    continue
                if " ".join(parts[1:]) not in known:
                    problems.append(f"line {n} of {path} names a variant not in variants.txt")
                    break
                outside = outside_problems(confine, [(f"line {n}", parts[0], os.path.join(idir, parts[0] + L.FGVC_EXT))],
                                           path)
                if outside:
                    problems += outside
                    break
                paths.append(os.path.join(idir, parts[0] + L.FGVC_EXT))
        sizes.append(len(paths))
        if not quick and os.path.isdir(idir):
            bad = missing_images(paths)
            if bad:
                problems.append(describe_missing(bad, os.path.basename(path), "Re-extract the images"))
            images[os.path.basename(path)] = paths
    return problems, f"{len(variants)} classes, train/val/test {'/'.join(map(str, sizes))}"


def check_variant(lay, ddir, quick, images, confine=None):
    problems = []
    idir = os.path.join(ddir, lay.image_dir)
    cfile = os.path.join(ddir, "classnames.txt")
    shared = os.path.join(os.path.dirname(ddir), "imagenet", "classnames.txt")
    if not os.path.isfile(cfile):
        if os.path.isfile(shared):
            cfile = shared  # the dataset falls back to ImageNet's
        else:
            problems.append(f"{os.path.join(ddir, 'classnames.txt')} is missing: copy "
                            f"$DATA/imagenet/classnames.txt there")
            cfile = None
    if not os.path.isdir(idir):
        return problems + [f"image folder {idir} is missing"], ""
    folders = [f for f in sorted(os.listdir(idir)) if not f.startswith(".") and f not in L.VARIANT_IGNORED]
    if not folders:
        problems.append(f"{idir} has no class folders")
    elif not quick:
        images[lay.image_dir] = folder_images(idir, folders)
    if cfile:
        classnames = L.read_classnames(cfile)
        if lay.key == "imagenetv2":
            missing = [str(i) for i in range(len(classnames)) if not os.path.isdir(os.path.join(idir, str(i)))]
            if missing:
                problems.append(f"{len(missing)} class folder(s) 0..{len(classnames) - 1} missing in {idir}, "
                                f"e.g. {missing[:SHOW]}")
        else:
            unknown = [f for f in folders if f not in classnames]
            if unknown:
                problems.append(f"folder(s) {unknown[:SHOW]} of {idir} are not in classnames.txt")
    return problems, f"{len(folders)} classes"


def folder_images(split_dir, folders):
    """Files of the class folders of ``split_dir`` (what the dataset lists)."""
    out = []
    for folder in folders:
        d = os.path.join(split_dir, folder)
        if os.path.isdir(d):
            out += [os.path.join(d, f) for f in sorted(os.listdir(d)) if not f.startswith(".")]
    return out


def check_pickle(path, ddir, keys, quick, images=None, fix=FEWSHOT_FIX, confine=None):
    """Few-shot cache / preprocessed.pkl: only Datum objects (read without running code), the
    expected keys, paths inside this dataset folder. Adds its images to ``images`` to decode."""
    try:
        data = datum_pickle.load(path, _Datum)
    except datum_pickle.UnsafePickleError as e:
        return [f"{path} is not a file of Dassl Datum objects: {e}. If you did not put it there, check "
                f"who can write to this $DATA; {fix}"]
    except Exception as e:
        return [f"{path} cannot be read ({type(e).__name__}: {e}): {fix}"]
    if not isinstance(data, dict) or any(k not in data for k in keys):
        have = sorted(map(str, data)) if isinstance(data, dict) else f"a {type(data).__name__}"
        return [f"{path} lacks the keys {list(keys)} (has {have}): {fix}"]
    for k in keys:
        if not isinstance(data[k], list):
            return [f"{path}: '{k}' is a {type(data[k]).__name__}, not a list of Dassl Datum objects: {fix}"]
        problem = next((p for p in (datum_pickle.datum_problem(it, _Datum) for it in data[k]) if p), None)
        if problem:
            return [f"{path}: '{k}' is not a list of Dassl Datum objects ({problem}): {fix}"]
    prefix = ddir.rstrip(os.sep) + os.sep
    impaths = [it.impath for k in keys for it in data[k]]
    foreign = [p for p in impaths if not p.startswith(prefix)]
    if confine is None and foreign and not missing_images(foreign[:50]):
        foreign = []  # --allow-outside-paths: the listed images are used where they are
    outside = outside_problems(confine, ((f"item {i} of '{k}'", it.impath, it.impath) for k in keys
                                         for i, it in enumerate(data[k]) if it.impath.startswith(prefix)), path)
    if outside:
        return outside
    if foreign:
        name = os.path.basename(ddir.rstrip(os.sep))
        local = [prefix + p.split(f"/{name}/", 1)[1] for p in foreign if f"/{name}/" in p]
        if len(local) == len(foreign) and not missing_images(local[:50]):
            if not quick and images is not None:  # decode what training will read: the remapped files
                images[os.path.relpath(path, ddir)] = [p for p in impaths if p.startswith(prefix)] + local
            return [f"note: {path} was written under another $DATA (e.g. {foreign[0]}); its paths are "
                    f"remapped to {ddir} when loaded (delete it to re-create it with local paths)"]
        return [f"{path} lists images outside {ddir} (e.g. {foreign[0]}) that are not found here: {fix}"]
    if not quick:
        bad = missing_images(impaths)
        if bad:
            return [describe_missing(bad, path, "Delete the cache or restore the images")]
        if images is not None:
            images[os.path.relpath(path, ddir)] = impaths
    return []


CHECKS = {"split": check_split, "generated": check_split, "imagenet": check_imagenet,
          "fgvc": check_fgvc, "imagenet_variant": check_variant}


def check_dataset(root, key, quick=False, full=False, sample=DEFAULT_SAMPLE, jobs=None, allow_outside=False):
    """Return (ok, lines) for one dataset. ``allow_outside``: images may lie outside its folder."""
    lay = L.LAYOUTS[key]
    ddir = lay.path(root)
    confine = None if allow_outside else L.Confinement(ddir, os.path.join(ddir, lay.image_dir), follow_files=not quick)
    if not os.path.isdir(ddir):
        if lay.kind == "generated":
            return True, [f"SKIP    {key}: {ddir} does not exist yet; it is generated on first use"]
        return False, [f"MISSING {key}: folder {ddir} does not exist; see {lay.doc}"]
    splits, fewshot = {}, {}
    problems, info = CHECKS[lay.kind](lay, ddir, quick, splits, confine)
    keys = ("train",) if lay.kind == "imagenet" else ("train", "val")
    if lay.kind in ("split", "generated", "fgvc", "imagenet"):
        for pkl in sorted(glob.glob(os.path.join(ddir, "split_fewshot", "*.pkl"))):
            problems += check_pickle(pkl, ddir, keys, quick, fewshot, confine=confine)
    if not quick:
        problems += decode_check(key, splits, fewshot, full, sample, jobs)
    notes = [p for p in problems if p.startswith("note: ")]
    errors = [p for p in problems if not p.startswith("note: ")]
    if errors:
        lines = [f"PROBLEM {key} ({ddir}): see {lay.doc}"] + [f"    - {p}" for p in errors]
    else:
        lines = [f"OK      {key}: {info}"]
    return not errors, lines + [f"    - {p}" for p in notes]


def decode_check(key, splits, fewshot, full, sample, jobs):
    """Decode every few-shot image and ``sample`` random existing images per split (all: ``full``)."""
    rng = random.Random(SAMPLE_SEED)
    chosen = {}  # path -> where it is listed (first mention)
    for what, paths in fewshot.items():
        for p in paths:
            chosen.setdefault(p, what)
    for what, paths in splits.items():
        unique = list(dict.fromkeys(paths))
        picked = unique if full or len(unique) <= sample else rng.sample(unique, sample)
        for p in (p for p in picked if not L.image_problem(p)):  # missing ones are reported already
            chosen.setdefault(p, f"the {what}" if not what.startswith("the ") else what)
    bad = decode_images(list(chosen), key, jobs or min(8, os.cpu_count() or 1))
    if not bad:
        return []
    by_source = {}
    for p, why in bad:
        by_source.setdefault(chosen[p], []).append((p, why))
    scope = "all images" if full else f"few-shot images + {sample} random images per split"
    return [f"{len(items)} image(s) of {src} cannot be decoded ({scope} checked), e.g. "
            + "; ".join(f"{p} ({why})" for p, why in items[:SHOW])
            + ". Replace them with good copies (see DATASETS.md); --full checks every image"
            for src, items in by_source.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.environ.get("DATA"),
                   help="the $DATA folder (default: the DATA environment variable)")
    p.add_argument("--quick", action="store_true", help="skip the per-image checks (existence and decoding)")
    p.add_argument("--full", action="store_true", help="decode every image, not only a sample")
    p.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, metavar="N",
                   help=f"random images decoded per split (default {DEFAULT_SAMPLE}), besides the few-shot caches")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="accept images outside their dataset folder (as DATASET.ALLOW_OUTSIDE_PATHS True does)")
    p.add_argument("--jobs", type=int, default=0, metavar="N", help="decoding threads (default: CPUs, at most 8)")
    p.add_argument("--protocol", choices=list(R.PROTOCOLS),
                   help="check the datasets this protocol uses (spotlighter/registry.py) instead of a list")
    p.add_argument("--source", default=os.environ.get("SOURCE") or R.DEFAULT_SOURCE,
                   help=f"with --protocol xd/dg: the source dataset (default: SOURCE or {R.DEFAULT_SOURCE})")
    p.add_argument("datasets", nargs="*", metavar="DATASET",
                   help=f"datasets to check (default: all): {' '.join(L.LAYOUTS)}")
    args = p.parse_args(argv)
    if not args.root:
        print("error: give --root $DATA (or set DATA); see DATASETS.md", file=sys.stderr)
        return 2
    root = os.path.abspath(os.path.expanduser(args.root))
    if not os.path.isdir(root):
        print(f"error: {root} does not exist or is not a folder; see DATASETS.md", file=sys.stderr)
        return 2
    unknown = [d for d in args.datasets if d not in L.LAYOUTS]
    if unknown:
        print(f"error: unknown dataset(s) {' '.join(unknown)}. Valid datasets: {' '.join(L.LAYOUTS)}",
              file=sys.stderr)
        return 2
    if args.protocol:
        if args.datasets:
            print("error: give either --protocol or DATASET names, not both", file=sys.stderr)
            return 2
        try:
            args.datasets = protocol_datasets(args.protocol, args.source)
        except R.RegistryError as exc:
            print(f"error: --source: {exc}", file=sys.stderr)
            return 2
    keys = args.datasets or list(L.LAYOUTS)
    print(f"Checking {len(keys)} dataset(s) under {root}")
    bad = []
    for key in keys:
        ok, lines = check_dataset(root, key, quick=args.quick, full=args.full, sample=max(args.sample, 0),
                                  jobs=args.jobs or None, allow_outside=args.allow_outside_paths)
        print("\n".join(lines))
        if not ok:
            bad.append(key)
    if bad:
        print(f"\n{len(bad)} of {len(keys)} dataset(s) need attention: {' '.join(bad)} "
              f"(instructions: DATASETS.md)")
        return 1
    print(f"\nAll {len(keys)} dataset(s) are ready.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
