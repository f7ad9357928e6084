"""``python -m spotlighter.benchmark {prepare,zeroshot} --root DATA_DIR``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

from . import data, pretrain

logger = logging.getLogger(__name__)

DATASET_SUBDIR = "minibench"
CLIP_RELPATH = os.path.join("clip", "minibench_clip.pt")


def dataset_dir(root: str) -> str:
    return os.path.join(root, DATASET_SUBDIR)


def clip_path(root: str) -> str:
    return os.path.join(dataset_dir(root), CLIP_RELPATH)


def prepare(root: str, *, seed: int = 0, dataset_params: Optional[dict] = None, clip_params: Optional[dict] = None) -> dict:
    """Ensure ``root/minibench`` (dataset) and ``root/minibench/clip/minibench_clip.pt`` (weights).

    The pretraining stream renders with ``pretrain.DEFAULT_CLIP_PARAMS["render"]`` (cleaner than the
    benchmark) unless ``clip_params["render"]`` overrides it. Returns a summary
    dict: paths, whether anything was built, the dataset meta and the CLIP sidecar (with its
    zero-shot accuracies).
    """
    dparams = dict(dataset_params or {})
    dparams["seed"] = seed
    cparams = dict(clip_params or {})
    cparams["seed"] = seed
    ddir = dataset_dir(root)
    cpath = clip_path(root)
    had_data = data.read_meta(ddir) is not None
    had_clip = pretrain.read_sidecar(cpath) is not None
    t0 = time.time()
    meta = data.ensure(ddir, **dparams)
    t_data = time.time() - t0
    t0 = time.time()
    side = pretrain.ensure_clip(cpath, dataset_dir=ddir, **cparams)
    t_clip = time.time() - t0
    return {
        "dataset_dir": os.path.abspath(ddir),
        "split_file": os.path.abspath(os.path.join(ddir, data.SPLIT_FILENAME)),
        "clip_path": os.path.abspath(cpath),
        "built_dataset": not had_data,
        "built_clip": not had_clip,
        "dataset_seconds": round(t_data, 1),
        "clip_seconds": round(t_clip, 1),
        "dataset": meta,
        "clip": side,
    }


def _fmt_acc(z: dict) -> str:
    return (
        f"base {z['base']:.2f}% (chance {z['chance_base']:.2f}%), "
        f"new {z['new']:.2f}% (chance {z['chance_new']:.2f}%), "
        f"all {z['all']:.2f}% (chance {z['chance_all']:.2f}%) "
        f"on {z['num_images']} {z['split']} images, prompt {z['template']!r}"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spotlighter.benchmark", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="generate the MiniBench dataset and pretrain its small CLIP (idempotent)")
    pp.add_argument("--root", required=True, help="data root; writes ROOT/minibench")
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--train-per-class", type=int, default=data.DEFAULT_PARAMS["train_per_class"])
    pp.add_argument("--val-per-class", type=int, default=data.DEFAULT_PARAMS["val_per_class"])
    pp.add_argument("--test-per-class", type=int, default=data.DEFAULT_PARAMS["test_per_class"])
    pp.add_argument("--pretrain-steps", type=int, default=pretrain.DEFAULT_CLIP_PARAMS["steps"])
    zp = sub.add_parser("zeroshot", help="re-measure the zero-shot accuracy of the prepared CLIP")
    zp.add_argument("--root", required=True)
    zp.add_argument("--split", default="test", choices=["train", "val", "test"])
    zp.add_argument("--template", default=pretrain.ZEROSHOT_TEMPLATE)
    zp.add_argument("--weights", default=None, help="CLIP weights (default: ROOT/minibench/clip/minibench_clip.pt)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)

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
            )
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not s["built_dataset"] and not s["built_clip"]:
            print("MiniBench already prepared; nothing to do.")
        print(f"dataset:  {s['dataset_dir']}  ({'generated in %.1fs' % s['dataset_seconds'] if s['built_dataset'] else 'cached'}; {s['dataset']['num_images']})")
        print(f"split:    {s['split_file']}")
        print(f"weights:  {s['clip_path']}  ({'pretrained in %.1fs' % s['clip']['train_seconds'] if s['built_clip'] else 'cached'}; {s['clip']['file_bytes'] / 2**20:.1f} MiB)")
        if "zeroshot" in s["clip"]:
            print(f"zero-shot: {_fmt_acc(s['clip']['zeroshot'])}")
        return 0

    ddir = dataset_dir(args.root)
    weights = args.weights or clip_path(args.root)
    if data.read_meta(ddir) is None or not os.path.isfile(weights):
        print(f"error: run `python -m spotlighter.benchmark prepare --root {args.root}` first", file=sys.stderr)
        return 2
    z = pretrain.zeroshot_accuracy(pretrain.load_clip(weights), ddir, split=args.split, template=args.template)
    print(f"weights:  {os.path.abspath(weights)}")
    print(f"zero-shot: {_fmt_acc(z)}")
    print(json.dumps(z))
    return 0
