"""Accuracy side of the token-dropping trade-off: base-to-novel on MiniBench for each
MODEL.PRUNE setting (blocks x keep rate), all seeds, and the Base / New / HM table.

    python scripts/prune_sweep.py [--data data] [--output output/prune_sweep] [--seeds 1 2 3]
        [--settings none 1:0.5 ...] [--runs spotlighter:minibench_ep10_paper zsclip:minibench]

A setting is ``none`` (no dropping) or ``LAYERS:KEEP[:MODE]`` with LAYERS comma-separated 0-based
blocks, e.g. ``1,2:0.5`` = MODEL.PRUNE.LAYERS [1, 2] MODEL.PRUNE.KEEP 0.5 (EViT dropping), or
``1,2:0.6:merge`` = the same with MODEL.PRUNE.MODE merge (ToMe merging). Each (run, setting) goes through
scripts/base2new.sh (so finished seeds are skipped on a re-run) into OUTPUT/<setting>/. The speed
side is ``python -m spotlighter.bench`` (docs/efficiency.md). MiniBench's CLIP has 4 vision
blocks (64 patches): block b of 4 is at the relative depth of block 3b of ViT-B/16's 12.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from spotlighter.results.parse import collect  # noqa: E402
from spotlighter.results.stats import harmonic_mean, summarize  # noqa: E402

DEFAULT_SETTINGS = ["none", "2:0.875", "2:0.75", "2:0.5", "2:0.25", "2:0.2", "1:0.875", "1:0.75", "1:0.5", "1,2:0.7",
                    "1,2:0.6",
                    # merging (MODEL.PRUNE.MODE merge)
                    "2:0.5:merge", "1,2:0.7:merge", "0,1,2:0.85:merge", "0,1,2:0.8:merge", "1,2:0.65:merge",
                    "1,2:0.6:merge", "0,1,2:0.75:merge", "0,1,2:0.7:merge", "1:0.5:merge", "0,1:0.75:merge", "0,1:0.7:merge",
                    "1,2:0.5:merge", "0:0.5:merge"]
DEFAULT_RUNS = ["spotlighter:minibench_ep10_paper", "zsclip:minibench"]
SHOTS = 16
DATASET = "minibench"
#: MiniBench's 4-block CLIP block b sits at the relative depth of block 3b of ViT-B/16's 12.
TWIN_ARCH, TWIN_FACTOR = "ViT-B/16", 3


def parse_setting(text: str):
    """'none' -> None; 'L1,L2:KEEP[:MODE]' -> PruneSpec (clear error otherwise)."""
    if text == "none":
        return None
    from spotlighter.backbone import PruneSpec

    try:
        return PruneSpec.parse(text)
    except ValueError as e:
        raise SystemExit(f"error: setting {text!r} is not 'none' or LAYERS:KEEP[:MODE] ({e})") from None


def tag(text: str) -> str:
    return "none" if text == "none" else "L" + text.replace(",", "-").replace(":", "_k", 1).replace(":", "_")


def prune_opts(spec) -> list[str]:
    if spec is None:
        return []
    opts = ["MODEL.PRUNE.LAYERS", "[" + ",".join(map(str, spec.layers)) + "]", "MODEL.PRUNE.KEEP", str(spec.keep)]
    return opts + (["MODEL.PRUNE.MODE", spec.mode] if spec.mode != "drop" else [])


def run(trainer: str, cfg: str, setting_text: str, args) -> int:
    env = dict(os.environ, DATA=os.path.abspath(args.data), OUTPUT=os.path.join(os.path.abspath(args.output), tag(setting_text)),
               CFG=cfg, SEEDS=" ".join(map(str, args.seeds)), PYTHON=args.python)
    cmd = ["bash", os.path.join(REPO, "scripts", "base2new.sh"), trainer, DATASET, str(SHOTS),
           *prune_opts(parse_setting(setting_text))]
    print(f"[prune_sweep] {trainer} {cfg} {setting_text}: {' '.join(cmd[2:])}", flush=True)
    with open(os.path.join(args.output, f"{tag(setting_text)}-{trainer}-{cfg}.log"), "w") as log:
        return subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def table(args) -> list[dict]:
    rows = []
    for item in args.runs:
        trainer, cfg = item.split(":")
        ref_hm = None
        for text in args.settings:
            res = collect(os.path.join(args.output, tag(text)), "base2new", trainers=[trainer], configs=[cfg],
                          datasets=[DATASET], shots=[SHOTS], seeds=args.seeds)
            acc = {(r.role, r.seed): r.accuracy for r in res if r.accuracy is not None}
            base = summarize([acc[("base", s)] for s in args.seeds if ("base", s) in acc])
            new = summarize([acc[("new", s)] for s in args.seeds if ("new", s) in acc])
            hms = summarize([harmonic_mean(acc[("base", s)], acc[("new", s)]) for s in args.seeds
                             if ("base", s) in acc and ("new", s) in acc])
            hm = harmonic_mean(base.mean, new.mean) if base.ok and new.ok else None
            if text == "none":
                ref_hm = hm
            rows.append(dict(run=item, setting=text, base=base, new=new, hm=hm, hm_seeds=hms,
                             delta=None if hm is None or ref_hm is None else hm - ref_hm))
    return rows


def fmt(stat) -> str:
    if not stat.ok:
        return "—"
    return f"{stat.mean:.2f} ± {stat.std:.2f} ({stat.n})" if stat.std is not None else f"{stat.mean:.2f} ({stat.n})"


def twin(text: str):
    """The ViT-B/16 setting at the same relative depths ('none' for none) and its multiply-add bound."""
    import dataclasses

    from spotlighter.bench import encoder_macs

    if text == "none":
        return "none", 1.0
    spec = parse_setting(text)
    vit = dataclasses.replace(spec, layers=tuple(TWIN_FACTOR * b for b in spec.layers))
    return vit.label, encoder_macs(TWIN_ARCH) / encoder_macs(TWIN_ARCH, vit)


def print_table(rows) -> None:
    print(f"| run | MiniBench MODEL.PRUNE | Base | New | HM | HM per seed | ΔHM vs none | {TWIN_ARCH} twin | its MAC bound |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        hm = "—" if r["hm"] is None else f"{r['hm']:.2f}"
        delta = "—" if r["delta"] is None else f"{r['delta']:+.2f}"
        label, bound = twin(r["setting"])
        print(f"| {r['run']} | {r['setting']} | {fmt(r['base'])} | {fmt(r['new'])} | {hm} | {fmt(r['hm_seeds'])} | {delta} "
              f"| {label} | {bound:.2f}× |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(REPO, "data"), help="folder holding minibench/ (generated if missing)")
    p.add_argument("--output", default=os.path.join(REPO, "output", "prune_sweep"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="none or LAYERS:KEEP (default: %(default)s)")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="TRAINER:CONFIG (default: %(default)s)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--table-only", action="store_true", help="print the table of what is there; run nothing")
    args = p.parse_args(argv)
    for text in args.settings:
        parse_setting(text)
    if "none" not in args.settings:
        args.settings = ["none"] + args.settings  # the reference row of every ΔHM
    os.makedirs(args.output, exist_ok=True)
    failed = 0
    if not args.table_only:
        subprocess.check_call([args.python, "-m", "spotlighter.benchmark", "prepare", "--root", args.data], cwd=REPO)
        for item in args.runs:
            trainer, cfg = item.split(":")
            for text in args.settings:
                if run(trainer, cfg, text, args):
                    failed += 1
                    print(f"[prune_sweep] FAILED: {item} {text} (see {args.output}/{tag(text)}-{trainer}-{cfg}.log)")
    print_table(table(args))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
