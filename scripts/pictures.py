"""Pictures of what Spotlighter spotlights (and what MODEL.PRUNE drops), one PNG per image.

    python scripts/pictures.py --root DATA --dataset-config-file configs/datasets/minibench.yaml \
        --config-file configs/trainers/Spotlighter/minibench_ep10_paper_prune.yaml \
        [--model-dir OUTPUT/.../seed1 [--load-epoch 10]] --images a.png b.jpg --out pictures/ [KEY VALUE ...]

One PNG per image, <out>/<image stem>.png (<folder>_<stem>.png when two images share a stem).

Without --model-dir the model is the config's, untrained (zero-shot CLIP weights, prompts from
CTX_INIT, prototypes from the class names). The classes are the dataset's
(DATASET.SUBSAMPLE_CLASSES: base, new or all). Panels and colours: spotlighter/pictures.py.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
os.environ.setdefault("OUTDATED_IGNORE", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="", help="datasets folder ($DATA)")
    p.add_argument("--config-file", required=True)
    p.add_argument("--dataset-config-file", required=True)
    p.add_argument("--model-dir", default="", help="a training output folder (as for train.py --eval-only)")
    p.add_argument("--load-epoch", type=int, default=None)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--out", required=True, help="folder for the PNGs (<image stem>.png)")
    p.add_argument("--cell", type=int, default=0, help="pixels per patch cell (0: about 224 px per panel)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)

    import torch

    import train
    from spotlighter import pictures
    from spotlighter.config import MERGING_MODES

    targs = train.parse_args(["--root", args.root, "--config-file", args.config_file, "--dataset-config-file",
                              args.dataset_config_file, "--trainer", "Spotlighter", "--eval-only",
                              "--output-dir", os.path.join(args.out, ".run"), *args.opts])
    try:
        cfg = train.setup_cfg(targs)
    except train.UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        print(f"error: image(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    train.configure_logging()
    from dassl.engine import build_trainer

    import datasets  # noqa: F401  (registers the datasets)
    import trainers  # noqa: F401  (registers the trainers)

    try:
        trainer = build_trainer(cfg)
        if args.model_dir:
            trainer.load_model(args.model_dir, epoch=args.load_epoch)
        size = cfg.INPUT.SIZE[0]
        loaded = [pictures.load_image(path, size, cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD) for path in args.images]
    except train.known_errors() + (ValueError,) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = trainer.model
    x = torch.stack([t for t, _ in loaded]).to(trainer.device)
    spots = pictures.spotlight(model, x)
    os.makedirs(args.out, exist_ok=True)
    stems = [os.path.splitext(os.path.basename(path))[0] for path in args.images]
    if len(set(stems)) < len(stems):  # e.g. class folders with the same file names: prefix the folder
        stems = [f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}_{stem}"
                 for path, stem in zip(args.images, stems)]
    for path, stem, (_, view), spot in zip(args.images, stems, loaded, spots):
        cell = args.cell or pictures.default_cell(spot.grid)
        target = os.path.join(args.out, stem + ".png")
        pictures.render(view, spot, cell).save(target)
        gone = "merged away" if model.clip.prune.mode in MERGING_MODES else "dropped"
        print(f"{target}: Level-1 {spot.level1}, Level-2 {spot.level2}, {gone} per block "
              f"{[len(d) for d in spot.dropped]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
