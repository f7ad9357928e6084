"""``python -m spotlighter.benchmark {prepare,zeroshot} --root DATA_DIR``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from . import data, pretrain, recipe, reference
from .paths import CLIP_LOCK, clip_path, dataset_dir, read_sidecar

logger = logging.getLogger(__name__)

def prepare(root: str, *, seed: int = 0, dataset_params: Optional[dict] = None, clip_params: Optional[dict] = None,
            keys: Sequence[str] = tuple(data.SPECS), target_params: Optional[dict] = None,
            use_reference: bool = True, sizes: Sequence[str] = (recipe.STUDENT,)) -> dict:
    """Ensure every generated dataset ``root/<key>`` and the CLIP ``root/minibench/clip/minibench_clip.pt``
    (and, with ``sizes`` naming it, the teacher-size CLIP ``minibench_clip_teacher.pt`` beside it:
    ``clip_params`` with :data:`.recipe.CLIP_SIZES`' architecture over them).

    ``dataset_params`` apply to MiniBench (the source), ``target_params`` (e.g. smaller counts for
    tests) to the other datasets, which otherwise use their defaults; all use ``seed``. The CLIP is
    the shipped reference when its recipe is the requested one and ``use_reference`` (see
    :mod:`.reference`), else pretrained here. Returns a summary dict: paths, what was built and how
    long it took, the metas and the CLIP sidecar (with its zero-shot accuracies on every dataset).
    """
    cparams = dict(clip_params or {})
    cparams["seed"] = seed
    cpath = clip_path(root)
    for size in sizes:
        recipe.size_params(size)  # an unknown size is refused before anything is built
    built, seconds, metas = {}, {}, {}
    for key in keys:
        params = dict((dataset_params if key == "minibench" else target_params) or {})
        params["seed"] = seed
        d = dataset_dir(root, key)
        before = data.read_meta(d)
        t0 = time.time()
        metas[key] = data.ensure(d, key, **params)
        seconds[key] = round(time.time() - t0, 1)
        built[key] = before != metas[key]
        logger.info("%s: %s in %.1fs", key, "generated" if built[key] else "cached", seconds[key])
    from filelock import FileLock

    t0 = time.time()
    others = [dataset_dir(root, k) for k in keys if k != "minibench"]
    # two prepares on one $DATA: the second waits for the first's CLIP, then finds it in place
    clips, built_clips = {}, {}
    with FileLock(os.path.join(dataset_dir(root), CLIP_LOCK)):
        for size in dict.fromkeys((recipe.STUDENT, *sizes)):
            path = clip_path(root, size)
            had_clip, had_file = read_sidecar(path), _file_version(path)
            clips[size] = pretrain.ensure_clip(path, dataset_dir=dataset_dir(root),
                                               eval_dirs=others if size == recipe.STUDENT else (),
                                               use_reference=use_reference, **recipe.size_params(size, cparams))
            # reinstalled: same sidecar, new file
            built_clips[size] = had_clip != clips[size] or had_file != _file_version(path)
    side = clips[recipe.STUDENT]
    t_clip = time.time() - t0
    ddir = dataset_dir(root)
    return {
        "dataset_dir": os.path.abspath(ddir),
        "split_file": os.path.abspath(os.path.join(ddir, data.SPLIT_FILENAME)),
        "clip_path": os.path.abspath(cpath),
        "built_dataset": built.get("minibench", False),
        "built": built,
        "built_clip": built_clips[recipe.STUDENT],
        "clips": {size: {"path": os.path.abspath(clip_path(root, size)), "built": built_clips[size], "clip": c}
                  for size, c in clips.items()},
        "dataset_seconds": seconds.get("minibench", 0.0),
        "seconds": seconds,
        "clip_seconds": round(t_clip, 1),
        "dataset": metas.get("minibench"),
        "datasets": metas,
        "clip": side,
    }


def _file_version(path: str):
    """Identifies the file at ``path`` (None when there is none): a replaced file gets another."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _sizes(text: str) -> list:
    """``--sizes`` as a list of CLIP sizes (an unknown one is refused with the valid ones named)."""
    sizes = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in sizes if w not in recipe.CLIP_SIZES]
    if bad or not sizes:
        raise ValueError(f"--sizes {text!r}: {', '.join(bad) or 'nothing'} is not a MiniBench CLIP size; "
                         f"valid: {', '.join(recipe.CLIP_SIZES)}")
    return sizes


def describe_origin(side: dict) -> str:
    """Where the CLIP came from, and whether its accuracies compare with the reference CLIP's."""
    digest = side.get("digest") or "unknown"
    if side.get("origin") == "reference":
        return (f"the shipped reference CLIP (pretrained on {side.get('cpu')}, {side.get('torch_threads')} threads, "
                f"torch {side.get('torch')}; digest {digest[:16]})")
    how = f"pretrained here in {side.get('train_seconds')}s on {side.get('cpu')} (digest {digest[:16]})"
    ref = reference.matches(side.get("params") or {})
    if ref is None:
        return how + "; no reference CLIP has this recipe"
    if ref["digest"] == digest:
        return how + ": bit-identical to the shipped reference CLIP"
    return (how + ": differs from the shipped reference CLIP (another CPU kind or thread count), so its "
            "accuracies do not compare with the README's; delete it and run prepare without --pretrain "
            "to install the reference")


def _fmt_acc(z: dict) -> str:
    halves = [h for h in ("base", "new", "all") if h in z]
    accs = ", ".join(f"{h} {z[h]:.2f}% (chance {z['chance_' + h]:.2f}%)" for h in halves)
    return f"{z.get('dataset', 'minibench')}: {accs} on {z['num_images']} {z['split']} images, prompt {z['template']!r}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spotlighter.benchmark", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="generate the MiniBench dataset and pretrain its small CLIP (idempotent)")
    pp.add_argument("--root", required=True, help="data root; writes ROOT/minibench")
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--train-per-class", type=int, default=data.DEFAULT_PARAMS["train_per_class"])
    pp.add_argument("--val-per-class", type=int, default=data.DEFAULT_PARAMS["val_per_class"])
    pp.add_argument("--test-per-class", type=int, default=data.DEFAULT_PARAMS["test_per_class"])
    pp.add_argument("--pretrain-steps", type=int, default=recipe.DEFAULT_CLIP_PARAMS["steps"])
    pp.add_argument("--pretrain", action="store_true",
                    help="pretrain the CLIP here (minutes) instead of installing the shipped reference CLIP; "
                         "its weights, and every accuracy measured with them, then depend on this CPU kind")
    pp.add_argument("--sizes", default=",".join(recipe.CLIP_SIZES),
                    help="CLIP sizes to install or pretrain, comma-separated (default: all; the teacher-size CLIP "
                         "is for distilling trainers' teachers; --pretrain --sizes student skips its pretraining)")
    ep = sub.add_parser("export-reference",
                        help="(maintainers) make ROOT's pretrained CLIP the shipped reference CLIP "
                             "(spotlighter/benchmark/reference/)")
    ep.add_argument("--root", required=True)
    ep.add_argument("--sizes", default=recipe.STUDENT, help="CLIP sizes to export, comma-separated (student, teacher)")
    zp = sub.add_parser("zeroshot", help="re-measure the zero-shot accuracy of the prepared CLIP")
    zp.add_argument("--root", required=True)
    zp.add_argument("--split", default="test", choices=["train", "val", "test"])
    zp.add_argument("--template", default=pretrain.ZEROSHOT_TEMPLATE)
    zp.add_argument("--weights", default=None, help="CLIP weights (default: ROOT/minibench/clip/minibench_clip.pt)")
    cp = sub.add_parser("calibrate", help="headroom probe: zero-shot, 16-shot linear probe and a fast CoOp proxy "
                                          "on MiniBench (calibration instrument; the real numbers come from the trainers)")
    cp.add_argument("--root", required=True)
    cp.add_argument("--weights", default=None)
    cp.add_argument("--shots", type=int, default=16)
    cp.add_argument("--seeds", default="1,2,3")
    cp.add_argument("--config", default=None,
                    help="CoOp config whose context and schedule the proxy follows (default: the demo's, "
                         "configs/trainers/CoOp/minibench_ep50_ctx16.yaml); the flags below override it")
    cp.add_argument("--epochs", type=int, default=None)
    cp.add_argument("--lr", type=float, default=None)
    cp.add_argument("--n-ctx", type=int, default=None)
    cp.add_argument("--ctx-init", default=None,
                    help="CoOp proxy context initialisation ('' = random, CoOp's own default with --n-ctx 16)")
    args = ap.parse_args(argv)
    if os.path.exists(args.root) and not os.path.isdir(args.root):
        print(f"error: --root {args.root} is a file, not a folder: give the data folder ($DATA) that holds (or "
              "will hold) minibench/", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)
    from ..backbone import BackboneError

    try:
        return _run(args)
    except BackboneError as e:  # a CLIP that cannot be loaded or is not the one it claims to be
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.cmd == "prepare":
        try:
            s = prepare(
                args.root,
                seed=args.seed,
                dataset_params=dict(
                    train_per_class=args.train_per_class,
                    val_per_class=args.val_per_class,
                    test_per_class=args.test_per_class,
                ),
                clip_params=dict(steps=args.pretrain_steps),
                use_reference=not args.pretrain,
                sizes=_sizes(args.sizes),
            )
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # a read-only or full $DATA, a file where a folder should be
            where = f" {e.filename}" if e.filename else ""
            print(f"error: cannot write{where} ({e.strerror or e}): give a --root on a writable file system "
                  "with free space", file=sys.stderr)
            return 2
        if not any(s["built"].values()) and not any(c["built"] for c in s["clips"].values()):
            print("MiniBench already prepared; nothing to do.")
        for key, meta in s["datasets"].items():
            how = "generated in %.1fs" % s["seconds"][key] if s["built"][key] else "cached"
            print(f"dataset:  {os.path.abspath(dataset_dir(args.root, key))}  ({how}; {meta['num_images']})")
        print(f"split:    {s['split_file']}")
        print(f"weights:  {s['clip_path']}  ({'built' if s['built_clip'] else 'cached'}; "
              f"{s['clip']['file_bytes'] / 2**20:.1f} MiB)")
        print(f"CLIP:     {describe_origin(s['clip'])}")
        if "zeroshot" in s["clip"]:
            print(f"zero-shot: {_fmt_acc(s['clip']['zeroshot'])}")
        for z in (s["clip"].get("zeroshot_targets") or {}).values():
            print(f"zero-shot: {_fmt_acc(z)}")
        for size, c in s["clips"].items():
            if size != recipe.STUDENT:
                print(f"{size}:  {c['path']}  ({'built' if c['built'] else 'cached'}; {describe_origin(c['clip'])})")
                if "zeroshot" in c["clip"]:
                    print(f"{size} zero-shot: {_fmt_acc(c['clip']['zeroshot'])}")
        return 0

    if args.cmd == "export-reference":
        try:
            sizes = _sizes(args.sizes)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for size in sizes:
            try:
                meta = reference.export(clip_path(args.root, size), size=size)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            ref = reference.weights_file(size=size)
            print(f"reference: {ref} ({os.path.getsize(ref) / 2**20:.1f} MiB, "
                  f"{meta['sparse_rows']} trained token-embedding rows, digest {meta['digest'][:16]}...)")
        return 0
    ddir = dataset_dir(args.root)
    weights = args.weights or clip_path(args.root)
    if args.cmd == "calibrate":
        from ..run.protocol import REPO
        from .calibrate import DEFAULT_COOP_CONFIG, coop_proxy, proxy_settings

        config = args.config or os.path.join(REPO, DEFAULT_COOP_CONFIG)
        try:
            settings = proxy_settings(config)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for name in ("epochs", "lr", "n_ctx", "ctx_init"):
            if getattr(args, name) is not None:
                settings[name] = getattr(args, name)
        print("CoOp proxy: " + json.dumps(settings) + f" (from {config} and the flags)")
        rows = [coop_proxy(weights, ddir, shots=args.shots, seed=int(s), **settings) for s in args.seeds.split(",")]
        keys = [k for k in rows[0] if k not in ("num_test",)]
        for r in rows:
            print(json.dumps(r))
        mean = {k: round(float(np.mean([r[k] for r in rows])), 2) for k in keys}
        print("mean over seeds:", json.dumps(mean))
        print(f"CoOp base - ZS base = {mean['coop_base'] - mean['zs_base']:+.2f}; "
              f"CoOp new - ZS new = {mean['coop_new'] - mean['zs_new']:+.2f}; "
              f"ZS / chance: base {mean['zs_base'] / mean['chance']:.1f}x, new {mean['zs_new'] / mean['chance']:.1f}x")
        return 0
    if data.read_meta(ddir) is None or not os.path.isfile(weights):
        print(f"error: run `python -m spotlighter.benchmark prepare --root {args.root}` first", file=sys.stderr)
        return 2
    z = pretrain.zeroshot_accuracy(pretrain.load_clip(weights), ddir, split=args.split, template=args.template)
    print(f"weights:  {os.path.abspath(weights)}")
    print(f"zero-shot: {_fmt_acc(z)}")
    print(json.dumps(z))
    return 0
