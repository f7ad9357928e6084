"""``python -m spotlighter.results {base2new,xd,dg,fewshot} --root OUTPUT ...``: seed-averaged tables
(fewshot: accuracy vs shots per dataset, ``--plot``: the curve);
``python -m spotlighter.results compare {base2new,xd,dg} --root OUTPUT --a A --b B``: paired comparison."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from .constants import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, DEFAULT_FORMAT, DEFAULT_INTERVAL,
                        DG_TARGETS_BY_SOURCE, EXIT_NOTHING_FOUND, EXIT_OK, EXIT_PLOT_UNAVAILABLE,
                        EXIT_UNWRITABLE, FORMATS, INTERVAL_METHODS, PROTOCOLS, PROTOCOL_TITLES, XD_SOURCE,
                        XD_TARGETS_BY_SOURCE)
from .layout import search_patterns
from .parse import canonical_trainer, collect
from .latex import to_latex
from .published import load_protocol_published
from .tables import Table, build_tables, to_csv, to_markdown

logger = logging.getLogger(__name__)
PROG = "spotlighter-results"
EXIT_USAGE = 2  # argparse's own code for a bad command line
COMPARE_COMMAND = "compare"
#: Protocols the paired comparison knows (few-shot tables compare methods per shot count by eye).
COMPARE_PROTOCOLS = tuple(p for p in PROTOCOLS if p != "fewshot")


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(item) for item in _names(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__,
        epilog=f"Paired comparison of two methods with a confidence interval: {PROG} {COMPARE_COMMAND} -h")
    parser.add_argument("protocol", choices=PROTOCOLS, help="; ".join(f"{k}: {v}" for k, v in PROTOCOL_TITLES.items()))
    parser.add_argument("--root", default="output", help="output root of the runs (default: output)")
    parser.add_argument("--trainers", type=_names, help="e.g. spotlighter,coop,maple,zsclip (case-insensitive)")
    parser.add_argument("--configs", type=_names, help="trainer config names, e.g. vit_b16_ep20_paper")
    parser.add_argument("--datasets", "--dataset", type=_names,
                        help="datasets (base2new, fewshot) or targets (xd, dg) to show")
    parser.add_argument("--source", help="xd/dg: the dataset the models were trained on (default: the source whose "
                                         f"targets --datasets names, else {XD_SOURCE}), e.g. minibench")
    parser.add_argument("--shots", type=_ints, help="shot counts, e.g. 16 (default: every one found)")
    parser.add_argument("--seeds", type=_ints, help="expected seeds, e.g. 1,2,3 (default: every one found)")
    parser.add_argument("--format", choices=FORMATS, default=DEFAULT_FORMAT,
                        help="what stdout gets: markdown (default; with footnotes and deltas), csv (the --csv "
                             "rows), latex (booktabs tables: best of our rows per column in bold, published "
                             "rows marked with a dagger)")
    parser.add_argument("--std", action="store_true", help="latex: cells are mean ± sample std (default: mean)")
    parser.add_argument("--csv", metavar="FILE", help="also write the table(s) as CSV")
    parser.add_argument("--plot", metavar="FILE_OR_DIR", help="also write PNG bar chart(s) (fewshot: the accuracy-vs-"
                                                              "shots curve per dataset; needs matplotlib)")
    parser.add_argument("--plot-deltas", nargs="?", const="ZeroshotCLIP", default=None, metavar="TRAINER",
                        help="plot each method's difference to TRAINER (default ZeroshotCLIP) instead of accuracies")
    parser.add_argument("--plot-published", action="store_true",
                        help="also draw the published numbers shown in the table (hatched bars; fewshot: dashed "
                             "lines)")
    parser.add_argument("--no-published", action="store_true", help="hide published numbers and deltas")
    parser.add_argument("--published-methods", type=_names, default=[],
                        help="more published methods to show, or TRAINER=METHOD to compare a trainer with one")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: progress, -vv: every log read")
    return parser


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: {message}\n")
    return code


def _warn_unmatched(trainers: Sequence[str] | None, found: set[str]) -> None:
    found_lower = {f.lower() for f in found}
    for name in trainers or []:
        if not {canonical_trainer(name).lower(), name.lower()} & found_lower:
            logger.warning("no runs of trainer %r (%s) found", name, canonical_trainer(name))


def infer_source(protocol: str, datasets: Sequence[str] | None) -> str:
    """The xd/dg source whose registered targets include every one of ``datasets`` (ImageNet if none does)."""
    table = DG_TARGETS_BY_SOURCE if protocol == "dg" else XD_TARGETS_BY_SOURCE
    if datasets:
        for source, targets in table.items():
            if source != XD_SOURCE and set(datasets) - {source} <= set(targets):
                return source
    return XD_SOURCE


#: Where scripts/demo.sh writes by default, relative to the output root users pass (``output``).
DEMO_SUBDIR = "demo"


def nothing_found_hints(args: argparse.Namespace, source: str) -> list[str]:
    """What to type when nothing matched: the demo's own output folder, or another xd/dg source."""
    def found(root: Path, src: str) -> bool:
        return bool(collect(root, args.protocol, trainers=args.trainers, configs=args.configs,
                            datasets=args.datasets, shots=args.shots, seeds=args.seeds, source=src))

    root, hints = Path(args.root), []
    if args.protocol in ("xd", "dg") and not args.source:
        table = DG_TARGETS_BY_SOURCE if args.protocol == "dg" else XD_TARGETS_BY_SOURCE
        hints += [f"hint: runs from source {other} are there: add --source {other}"
                  for other in table if other != source and found(root, other)]
    demo = root / DEMO_SUBDIR
    if demo.is_dir():
        sources = [source] if args.protocol in ("base2new", "fewshot") or args.source else \
            list(DG_TARGETS_BY_SOURCE if args.protocol == "dg" else XD_TARGETS_BY_SOURCE)
        for src in sources:
            if found(demo, src):
                extra = f" --source {src}" if args.protocol in ("xd", "dg") and src != source else ""
                hints.append(f"hint: scripts/demo.sh writes to {demo}: python -m spotlighter.results "
                             f"{args.protocol} --root {demo}{extra}")
                break
    return hints


def _level(verbose: int) -> int:
    return (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]


def _confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, e.g. 0.95, got {text!r}") from exc
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, e.g. 0.95, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} {COMPARE_COMMAND}",
        description="Method A against method B over the (dataset, seed) pairs both have (xd/dg: (target, seed)): "
                    "the mean difference A − B of Base, New and HM (HM per pair from its own Base and New; xd/dg: "
                    "the target accuracy) with a confidence interval; 'A > B' or 'B > A' only when the interval "
                    "excludes 0, else 'no decision'. Pairs missing on one side are listed.")
    parser.add_argument("protocol", choices=COMPARE_PROTOCOLS,
                        help="; ".join(f"{k}: {v}" for k, v in PROTOCOL_TITLES.items() if k in COMPARE_PROTOCOLS))
    parser.add_argument("--root", default="output", help="output root of the runs (default: output)")
    parser.add_argument("--b", required=True, metavar="TRAINER[:CONFIG]",
                        help="method B, the baseline, e.g. coop or coop:vit_b16_ep50 (the config is needed only "
                             "when the trainer has runs of several)")
    parser.add_argument("--a", type=_names, metavar="TRAINER[:CONFIG][,...]",
                        help="method A, e.g. spotlighter:vit_b16_ep20_paper; several, comma-separated, are each "
                             "compared with B (default: every other method found)")
    parser.add_argument("--datasets", type=_names, help="datasets (base2new) or targets (xd, dg) to pair on")
    parser.add_argument("--source", help="xd/dg: the dataset the models were trained on (default: the source whose "
                                         f"targets --datasets names, else {XD_SOURCE}), e.g. minibench")
    parser.add_argument("--shots", type=int, help="shot count (needed when A and B share several)")
    parser.add_argument("--seeds", type=_ints, help="seeds to pair on, e.g. 1,2,3 (default: every one found)")
    parser.add_argument("--interval", choices=INTERVAL_METHODS, default=DEFAULT_INTERVAL,
                        help="t: paired Student t interval over the pairs (default); bootstrap: percentile "
                             "bootstrap over the pairs (seeded, deterministic)")
    parser.add_argument("--confidence", type=_confidence, default=CONFIDENCE,
                        help=f"confidence level of the interval (default {CONFIDENCE})")
    parser.add_argument("--resamples", type=_positive, default=BOOTSTRAP_RESAMPLES,
                        help=f"bootstrap: resamples (default {BOOTSTRAP_RESAMPLES})")
    parser.add_argument("--bootstrap-seed", type=int, default=BOOTSTRAP_SEED,
                        help=f"bootstrap: random seed (default {BOOTSTRAP_SEED})")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: progress, -vv: every log read")
    return parser


def compare_main(argv: Sequence[str]) -> int:
    """``spotlighter-results compare ...``; returns the exit code."""
    from .compare import CompareError, NothingFound, compare_all, render as render_comparisons

    args = build_compare_parser().parse_args(argv)
    logging.basicConfig(level=_level(args.verbose), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    source = args.source or infer_source(args.protocol, args.datasets)
    try:
        comparisons = compare_all(args.root, args.protocol, args.b, args.a, datasets=args.datasets,
                                  shots=args.shots, seeds=args.seeds, source=source, interval=args.interval,
                                  confidence=args.confidence, resamples=args.resamples, seed=args.bootstrap_seed)
    except NothingFound as exc:
        return _fail(str(exc), EXIT_NOTHING_FOUND)
    except CompareError as exc:
        return _fail(str(exc), EXIT_USAGE)
    sys.stdout.write(render_comparisons(comparisons))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spotlighter-results``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == COMPARE_COMMAND:
        return compare_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.std and args.format != "latex":
        parser.error("--std applies to --format latex (markdown cells always show mean ± std)")
    if args.protocol == "fewshot" and args.plot_deltas:
        parser.error("--plot-deltas applies to the bar charts of base2new, xd and dg (the few-shot curve shows "
                     "the zero-shot model as a flat line)")
    logging.basicConfig(level=_level(args.verbose), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.plot:
        from .plot import PlotUnavailable, figure_class

        try:
            figure_class()
        except PlotUnavailable as exc:
            return _fail(str(exc), EXIT_PLOT_UNAVAILABLE)

    source = args.source or infer_source(args.protocol, args.datasets)
    results = collect(args.root, args.protocol, trainers=args.trainers, configs=args.configs,
                      datasets=args.datasets, shots=args.shots, seeds=args.seeds, source=source)
    if not results:
        patterns = "\n  ".join(search_patterns(args.root, args.protocol, source))
        hints = "".join(f"\n{h}" for h in nothing_found_hints(args, source))
        return _fail(f"no {args.protocol} runs under {Path(args.root)} matching the filters; searched:\n  {patterns}"
                     f"{hints}", EXIT_NOTHING_FOUND)
    _warn_unmatched(args.trainers, {r.trainer for r in results})
    published = None if args.no_published else load_protocol_published(args.protocol)
    try:
        tables = build_tables(results, args.protocol, root=args.root, seeds=args.seeds, datasets=args.datasets,
                              published=published, published_methods=args.published_methods, source=source)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    sys.stdout.write(render(tables, args.format, std=args.std))
    # where files went: after a Markdown table on stdout, else on stderr (stdout stays valid CSV / LaTeX)
    say = sys.stdout.write if args.format == DEFAULT_FORMAT else sys.stderr.write
    if args.csv:
        try:
            Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
            Path(args.csv).write_text(to_csv(tables), encoding="utf-8")
        except OSError as exc:
            return _fail(f"cannot write the CSV to {args.csv}: {exc.strerror or exc}", EXIT_UNWRITABLE)
        say(f"\nCSV written to {Path(args.csv).resolve()}\n")
    if args.plot:
        from .plot import plot_tables

        try:
            paths = plot_tables(args.plot, tables, deltas_to=args.plot_deltas, published=args.plot_published)
        except OSError as exc:
            return _fail(f"cannot write the plot to {args.plot}: {exc.strerror or exc}", EXIT_UNWRITABLE)
        for path in paths:
            say(f"plot written to {Path(path).resolve()}\n")
    return EXIT_OK


def render(tables: Sequence[Table], fmt: str, *, std: bool = False) -> str:
    """The tables in ``fmt`` ('markdown', 'csv' or 'latex')."""
    if fmt == "csv":
        return to_csv(tables)
    if fmt == "latex":
        return "\n".join(to_latex(t, std=std) for t in tables)
    return "\n".join(to_markdown(t) for t in tables)
