"""Seed-averaged tables of the three protocols, as Markdown and CSV (LaTeX: ``latex.py``)."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..output_tree import ROLE_BASE, ROLE_NEW, ROLE_SOURCE, ROLE_TARGET, SEED_DIR_PREFIX
from .constants import (AVERAGE_HM_OF_MEANS, AVERAGE_MEAN_OF_HMS, BASE2NEW_DATASETS, BASE2NEW_SUITES,
                        CSV_ESCAPE_PREFIX, CSV_FORMULA_PREFIXES, DECIMALS, FEWSHOT_CSV_COLUMNS,
                        DG_TARGETS_BY_SOURCE, MISSING_MARK, PROTOCOL_TITLES, PUBLISHED_METHOD_FOR_TRAINER,
                        TRAINER_ORDER, TRANSDUCTIVE_MARK, TRANSFER_PUBLISHED_FILES, XD_SOURCE,
                        XD_TARGETS_BY_SOURCE, is_transductive)
from .layout import check_protocol, seed_dir_path
from .parse import Result
from .published import BaseNew, Published, TransferPublished
from .stats import EMPTY, Stat, harmonic_mean, summarize

CellValue = Stat | float | str | None


@dataclass(frozen=True)
class Method:
    """One trainer with one config: a row group (base2new) or a column (xd, dg)."""

    trainer: str
    config: str


@dataclass(frozen=True)
class Cell:
    """A table cell: a value, footnote numbers, and how to print it."""

    value: CellValue
    notes: tuple[int, ...] = ()
    signed: bool = False
    suffix: str = ""


@dataclass
class Chart:
    """Bars of one table: per panel, per series (method), one Stat per category (dataset); ``published``:
    the published numbers of the same panels and categories, per published method (drawn on request)."""

    title: str
    categories: list[str]
    panels: dict[str, dict[str, list[Stat]]]
    published: dict[str, dict[str, list[Stat]]] = field(default_factory=dict)


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper layout: a method (ours, or a published one) and its values."""

    label: str
    values: tuple[CellValue, ...]
    notes: tuple[tuple[int, ...], ...] = ()
    published: bool = False


@dataclass
class PaperTable:
    """The layout papers print (LaTeX): blocks of method rows; ``group_header`` names the first column
    of base-to-novel's per-dataset blocks (None: one block, methods as rows, datasets as columns)."""

    headers: list[str]
    blocks: list[tuple[str, list[PaperRow]]]
    group_header: str | None = None
    published_note: str = ""


@dataclass
class Table:
    """A rendered-ready table plus its machine-readable rows (``records``) and bar chart."""

    protocol: str
    shots: int
    title: str
    meta: str
    columns: list[str]
    rows: list[list[Cell]]
    footnotes: list[str] = field(default_factory=list)
    records: list[dict[str, object]] = field(default_factory=list)
    chart: Chart | None = None
    paper: PaperTable | None = None
    curve: object | None = None  # fewshot: its accuracy-vs-shots curve (spotlighter.results.fewshot.Curve)


class Notes:
    """Numbered, de-duplicated footnotes."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def add(self, text: str) -> int:
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text) + 1


# ----------------------------------------------------------------------------- grouping
def _trainer_rank(trainer: str) -> tuple[int, str]:
    order = {name.lower(): i for i, name in enumerate(TRAINER_ORDER)}
    return order.get(trainer.lower(), len(order)), trainer


def methods_of(results: Iterable[Result]) -> list[Method]:
    """Distinct (trainer, config) pairs in display order."""
    found = {Method(r.trainer, r.config) for r in results}
    return sorted(found, key=lambda m: (_trainer_rank(m.trainer), m.config))


def method_labels(methods: Sequence[Method], mark_transductive: bool = True) -> dict[Method, str]:
    """Trainer name, plus the config where a trainer appears with several configs; distilling trainers
    marked transductive where their protocol is (base-to-novel, cross-dataset; not DG, where they
    distil on the source's images)."""
    configs = defaultdict(set)
    for m in methods:
        configs[m.trainer].add(m.config)
    labels = {m: m.trainer if len(configs[m.trainer]) == 1 else f"{m.trainer} ({m.config})" for m in methods}
    return {m: label + (TRANSDUCTIVE_MARK if mark_transductive and is_transductive(m.trainer) else "")
            for m, label in labels.items()}


def ordered_datasets(found: Iterable[str], canonical: Sequence[str]) -> list[str]:
    """Every ``canonical`` dataset (in order) once one of them is found, then any other found, alphabetically.

    A protocol's table thus shows its missing datasets as missing; a tree holding only non-canonical
    datasets (e.g. a synthetic one) shows just those.
    """
    found = set(found)
    listed = list(canonical) if found & set(canonical) else []
    return listed + sorted(found - set(canonical))


def base2new_canonical(found: Iterable[str]) -> tuple[str, ...]:
    """The base-to-novel suites (``BASE2NEW_SUITES``) that hold a found dataset, concatenated in order:
    the datasets a base-to-novel table lists, missing ones included (the published 11 when none is found)."""
    found = set(found)
    suites = [s for s in BASE2NEW_SUITES if found & set(s)] or [BASE2NEW_DATASETS]
    return tuple(dict.fromkeys(d for s in suites for d in s))


def _single_shots(results: Sequence[Result], shots: int | None) -> int:
    values = sorted({r.shots for r in results})
    if shots is not None:
        return shots
    if len(values) != 1:
        raise ValueError(f"results hold several shot counts {values}; pass shots=")
    return values[0]


class _Index:
    """Results of one shot count, looked up by method, dataset, role and seed."""

    def __init__(self, results: Sequence[Result], root: str | Path, protocol: str, shots: int,
                 seeds: Sequence[int] | None, source: str = XD_SOURCE) -> None:
        self.root, self.protocol, self.shots, self.source = root, protocol, shots, source
        self.totals: list[tuple[float, int]] = []  # (accuracy, test images) of every result read
        self.runs: dict[tuple[Method, str, str], dict[int, Result]] = defaultdict(dict)
        found_seeds: dict[Method, set[int]] = defaultdict(set)
        for r in results:
            if r.shots != shots:
                continue
            method = Method(r.trainer, r.config)
            self.runs[(method, r.dataset, r.role)][r.seed] = r
            if r.accuracy is not None and r.total:
                self.totals.append((r.accuracy, r.total))
            found_seeds[method].add(r.seed)
        self.expected = {m: sorted(seeds) if seeds else sorted(s) for m, s in found_seeds.items()}

    def values(self, method: Method, dataset: str, role: str, notes: Notes) -> tuple[dict[int, float], tuple[int, ...]]:
        """Per-seed accuracies of one cell, and footnotes for every expected seed without one."""
        runs = self.runs.get((method, dataset, role), {})
        values = {s: r.accuracy for s, r in runs.items() if r.accuracy is not None}
        refs: list[int] = []
        where = f"{method.trainer}/{method.config} {dataset} {role}"
        for seed in self.expected.get(method, []):
            if seed in runs and runs[seed].reason:
                refs.append(notes.add(f"{where} seed {seed}: {runs[seed].reason}"))
        absent = [s for s in self.expected.get(method, []) if s not in runs]
        if absent and not runs:
            pattern = seed_dir_path(self.root, self.protocol, method.trainer, method.config, "<dataset>", role,
                                    self.shots, 0, self.source).parent / f"{SEED_DIR_PREFIX}<S>"
            refs.append(notes.add(f"{method.trainer}/{method.config} {role}: no run folder for this dataset "
                                  f"(searched {pattern})"))
        elif absent:
            path = seed_dir_path(self.root, self.protocol, method.trainer, method.config, dataset, role,
                                 self.shots, absent[0], self.source).parent
            seeds = ", ".join(map(str, absent))
            plural = "s" if len(absent) > 1 else ""
            refs.append(notes.add(f"{where}: seed{plural} {seeds} missing (no folder in {path})"))
        return values, tuple(refs)

    def seeds_text(self, given: bool) -> str:
        seeds = sorted({s for v in self.expected.values() for s in v})
        return ", ".join(map(str, seeds)) + ("" if given else " (as found)")


def standard_error(accuracy: float, total: int) -> float:
    """Binomial standard error (percent points) of one accuracy measured on ``total`` test images."""
    p = min(max(accuracy / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / total)


def se_text(index: _Index) -> str:
    """The standard error of one accuracy of the table (its largest, and the test-set sizes), or ''."""
    if not index.totals:
        return ""
    worst = max(standard_error(a, n) for a, n in index.totals)
    sizes = sorted({n for _, n in index.totals})
    size = f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,}–{sizes[-1]:,}"
    return (f" · standard error of one accuracy ≤ {worst:.2f} points (binomial, √(p(1−p)/n), "
            f"n = {size} test images)")


def _meta(root: str | Path, shots: int, index: _Index, given_seeds: bool) -> str:
    return (
        f"root: `{root}` · shots: {shots} · seeds: {index.seeds_text(given_seeds)} · "
        "cells: mean ± sample std over seeds (seed count)" + se_text(index)
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _join(notes: Notes, refs: Iterable[int]) -> str:
    return "; ".join(notes.texts[i - 1] for i in sorted(set(refs)))


# ----------------------------------------------------------------------------- base-to-novel
B2N_CSV_COLUMNS = [
    "protocol", "shots", "trainer", "config", "dataset",
    "base_mean", "base_std", "base_n", "new_mean", "new_std", "new_n", "hm_mean", "hm_std", "hm_n",
    "seeds_expected", "complete", "published_method", "pub_base", "pub_new", "pub_hm",
    "delta_base", "delta_new", "delta_hm", "notes",
]


PUBLISHED_NOTE = (
    "\n\nPub. = Table I of the Spotlighter paper (spotlighter/data/base2new_published.csv, see its caveats); "
    "Δ = ours − published; the published Average is recomputed as HM(mean Base, mean New) over the datasets "
    "our Average covers."
)


BASE2NEW_PUBLISHED_CITATION = "Table I of Spotlighter (EMNLP 2025 Findings)"


METRICS = ("base", "new", "hm")
METRIC_LABELS = ("Base", "New", "HM")


@dataclass
class _B2NRow:
    """Base, New and HM of one method on one dataset, their footnotes, and whether every seed is there."""

    stats: tuple[Stat, Stat, Stat]
    refs: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    complete: bool


def _b2n_row(index: _Index, method: Method, dataset: str, notes: Notes) -> _B2NRow:
    base_vals, base_refs = index.values(method, dataset, ROLE_BASE, notes)
    new_vals, new_refs = index.values(method, dataset, ROLE_NEW, notes)
    base, new = summarize(list(base_vals.values())), summarize(list(new_vals.values()))
    hm = EMPTY
    if base.ok and new.ok:
        common = sorted(set(base_vals) & set(new_vals))
        per_seed = summarize([harmonic_mean(base_vals[s], new_vals[s]) for s in common])
        hm = Stat(harmonic_mean(base.mean, new.mean), per_seed.std, per_seed.n)  # type: ignore[arg-type]
    expected = set(index.expected.get(method, []))
    complete = bool(expected) and expected <= set(base_vals) and expected <= set(new_vals)
    return _B2NRow((base, new, hm), (base_refs, new_refs, base_refs + new_refs), complete)


def resolve_published_methods(
    published: Published | TransferPublished, methods: Sequence[Method], extra: Sequence[str] = ()
) -> tuple[dict[str, str], list[str]]:
    """Trainer -> published method (default map plus ``TRAINER=Method`` items), and published-only methods.

    The default map is the registry's ``published_method`` of each trainer, else a published method of the
    trainer's own name (e.g. CoCoOp, PromptSRC). A plain name in ``extra`` that is also one of our trainers
    compares that trainer with it; otherwise its published rows are shown on their own.
    """
    mapping = {t: m for t, m in PUBLISHED_METHOD_FOR_TRAINER.items() if published.method_name(m)}
    for m in methods:
        same_name = published.method_name(m.trainer)
        if m.trainer not in PUBLISHED_METHOD_FOR_TRAINER and same_name:
            mapping[m.trainer] = same_name
    ours = {m.trainer.lower(): m.trainer for m in methods}
    only: list[str] = []
    for item in extra:
        trainer, _, name = item.partition("=") if "=" in item else ("", "", item)
        method = published.method_name(name.strip())
        if method is None:
            raise ValueError(f"unknown published method {name.strip()!r}; known: {', '.join(published.methods)}")
        trainer = trainer.strip() or method
        if trainer.lower() in ours:
            mapping[ours[trainer.lower()]] = method
        elif method not in only:
            only.append(method)
    return mapping, only


def _pub_cells(values: BaseNew | None) -> list[Cell]:
    return [Cell(v) for v in (values or (None, None, None))]


def _deltas(ours: Sequence[float | None], pub: BaseNew | None) -> list[float | None]:
    if pub is None:
        return [None, None, None]
    return [None if o is None else o - p for o, p in zip(ours, pub, strict=True)]


def _average_of(rows: Sequence[_B2NRow]) -> tuple[float | None, float | None, float | None]:
    """Mean Base, mean New and HM(mean Base, mean New) over ``rows`` (the published convention); Nones
    when there are none."""
    if not rows:
        return None, None, None
    base = statistics.fmean(r.stats[0].mean for r in rows)  # type: ignore[misc]
    new = statistics.fmean(r.stats[1].mean for r in rows)  # type: ignore[misc]
    return base, new, harmonic_mean(base, new)


def _mean_of_hms(rows: Sequence[_B2NRow]) -> tuple[float | None, float | None, float | None]:
    """Mean Base, mean New and the mean of the per-dataset HMs over ``rows``; Nones when there are none."""
    if not rows:
        return None, None, None
    return tuple(statistics.fmean(r.stats[i].mean for r in rows) for i in range(3))  # type: ignore[return-value,misc]


def average_label(covered: int, shown: int, convention: str = AVERAGE_HM_OF_MEANS) -> str:
    """The first cell of a base-to-novel average row: how many datasets it covers, and how it averages."""
    return f"Average ({covered} of {shown} datasets), {convention}"


@dataclass
class _B2NLayout:
    """Collects the rows and CSV records of one base-to-novel table."""

    shots: int
    with_config: bool
    with_pub: bool
    rows: list[list[Cell]] = field(default_factory=list)
    records: list[dict[str, object]] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        columns = ["Dataset", "Trainer"] + (["Config"] if self.with_config else []) + list(METRIC_LABELS)
        pub = [f"Pub. {m}" for m in METRIC_LABELS] + [f"Δ {m}" for m in METRIC_LABELS]
        return columns + (pub if self.with_pub else [])

    def add(self, first: str, method: Method, ours: Sequence[Cell], values: Sequence[float | None],
            pub_method: str | None, pub: BaseNew | None, record: dict[str, object]) -> None:
        deltas = _deltas(values, pub)
        name = method.trainer + (TRANSDUCTIVE_MARK if is_transductive(method.trainer) else "")
        cells = [Cell(first), Cell(name)] + ([Cell(method.config)] if self.with_config else []) + list(ours)
        if self.with_pub:
            cells += _pub_cells(pub) + [Cell(d, signed=True) for d in deltas]
        self.rows.append(cells)
        record.update(protocol="base2new", shots=self.shots, trainer=method.trainer, config=method.config,
                      transductive=is_transductive(method.trainer), published_method=pub_method or "")
        for key, pub_value, delta in zip(METRICS, pub or (None, None, None), deltas, strict=True):
            record.update({f"pub_{key}": _round(pub_value), f"delta_{key}": _round(delta)})
        self.records.append(record)


def base2new_table(
    results: Sequence[Result],
    *,
    root: str | Path = "",
    shots: int | None = None,
    seeds: Sequence[int] | None = None,
    datasets: Sequence[str] | None = None,
    published: Published | None = None,
    published_methods: Sequence[str] = (),
) -> Table:
    """Base, New, HM per dataset and method, the Average row, and published numbers with deltas."""
    shots = _single_shots(results, shots)
    index = _Index(results, root, "base2new", shots, seeds)
    methods = [m for m in methods_of(results) if m in index.expected]
    found = [r.dataset for r in results if r.shots == shots]
    shown = list(datasets) if datasets else ordered_datasets(found, base2new_canonical(found))
    labels = method_labels(methods)
    mapping, only = resolve_published_methods(published, methods, published_methods) if published else ({}, [])
    # Pub./Δ columns only when some shown dataset has a published number (none for e.g. MiniBench).
    with_pub = published is not None and (
        any(published.get(mapping[m.trainer], d) for m in methods if m.trainer in mapping for d in shown)
        or any(published.get(method, d) for method in only for d in shown))
    layout = _B2NLayout(shots, any(labels[m] != m.trainer for m in methods), with_pub)
    notes = Notes()
    computed = {(m, d): _b2n_row(index, m, d, notes) for m in methods for d in shown}

    def pub_of(method: str | None, dataset: str) -> BaseNew | None:
        return published.get(method, dataset) if published and method else None

    for dataset in shown:
        for m in methods:
            row, seeds_text = computed[(m, dataset)], " ".join(map(str, index.expected[m]))
            record: dict[str, object] = {"dataset": dataset, "seeds_expected": seeds_text, "complete": row.complete,
                                         "notes": _join(notes, row.refs[2])}
            for key, stat in zip(METRICS, row.stats, strict=True):
                record.update({f"{key}_mean": _round(stat.mean), f"{key}_std": _round(stat.std), f"{key}_n": stat.n})
            layout.add(dataset, m, [Cell(st, r) for st, r in zip(row.stats, row.refs, strict=True)],
                       [st.mean for st in row.stats], mapping.get(m.trainer), pub_of(mapping.get(m.trainer), dataset),
                       record)
        for method in only:
            layout.add(dataset, Method(f"{method} (published)", MISSING_MARK), _pub_cells(pub_of(method, dataset)),
                       (None, None, None), None, None, {"dataset": dataset, "notes": "published numbers only"})

    averages: dict[Method, list[Stat]] = {}
    layout_average_cells: dict[Method, list[Cell]] = {}
    with_average = len(shown) > 1  # an average over one dataset repeats its row
    for m in methods if with_average else ():
        covered = [d for d in shown if computed[(m, d)].complete]
        excluded = [d for d in shown if d not in covered]
        refs = (notes.add(f"{labels[m]} averages: over complete datasets only; "
                          f"excluded: {', '.join(excluded)}"),) if excluded else ()
        values = _average_of([computed[(m, d)] for d in covered])
        averages[m] = [Stat(v, None, len(covered)) for v in values]
        pub_method = mapping.get(m.trainer)
        pub = published.average(pub_method, covered) if published and pub_method and covered else None
        record = {"dataset": "average", "seeds_expected": " ".join(map(str, index.expected[m])),
                  "complete": not excluded, "notes": _join(notes, refs),
                  **{f"{k}_mean": _round(v) for k, v in zip(METRICS, values, strict=True)}}
        layout_average_cells[m] = [Cell(v, refs) for v in values]
        layout.add(average_label(len(covered), len(shown)), m, layout_average_cells[m], values,
                   pub_method, pub, record)
        # the other convention: the mean of the per-dataset HMs (Base and New are the same means)
        values = _mean_of_hms([computed[(m, d)] for d in covered])
        pub = published.mean_of_hms(pub_method, covered) if published and pub_method and covered else None
        record = {"dataset": "average_of_hms", "seeds_expected": " ".join(map(str, index.expected[m])),
                  "complete": not excluded, "notes": _join(notes, refs),
                  **{f"{k}_mean": _round(v) for k, v in zip(METRICS, values, strict=True)}}
        layout.add(average_label(len(covered), len(shown), AVERAGE_MEAN_OF_HMS), m,
                   [Cell(v, refs) for v in values], values, pub_method, pub, record)
    for method in only if with_average else ():
        have = [d for d in shown if pub_of(method, d)]
        pub = published.average(method, have) if published and have else None
        layout.add(average_label(len(have), len(shown)), Method(f"{method} (published)", MISSING_MARK),
                   _pub_cells(pub), (None, None, None), None, None,
                   {"dataset": "average", "notes": "published numbers only"})
        pub = published.mean_of_hms(method, have) if published and have else None
        layout.add(average_label(len(have), len(shown), AVERAGE_MEAN_OF_HMS),
                   Method(f"{method} (published)", MISSING_MARK), _pub_cells(pub), (None, None, None), None, None,
                   {"dataset": "average_of_hms", "notes": "published numbers only"})

    title = f"{PROTOCOL_TITLES['base2new']} ({shots} shots)"
    panels = {
        label: {labels[m]: [computed[(m, d)].stats[i] for d in shown] + ([averages[m][i]] if with_average else [])
                for m in methods}
        for i, label in enumerate(METRIC_LABELS)
    }
    meta = _meta(root, shots, index, seeds is not None) + (PUBLISHED_NOTE if with_pub else "")

    # Published methods beside ours: those our trainers map to, then the ones asked for on their own.
    pub_methods = list(dict.fromkeys([mapping[m.trainer] for m in methods if m.trainer in mapping] + only))
    pub_methods = [p for p in pub_methods if with_pub and any(pub_of(p, d) for d in shown)]

    # The paper layout leaves out the datasets none of our rows has a value for (the Markdown lists them).
    with_data = [d for d in shown if any(st.ok for m in methods for st in computed[(m, d)].stats)] or shown

    def pub_average(method: str) -> BaseNew | None:
        have = [d for d in with_data if pub_of(method, d)]
        return published.average(method, have) if published and have else None

    def pub_stats(values: BaseNew | None) -> list[Stat]:
        return [Stat(v, None, 0) if values else EMPTY for v in (values or (None, None, None))]

    blocks: list[tuple[str, list[PaperRow]]] = []
    for dataset in with_data:
        rows = [PaperRow(labels[m], computed[(m, dataset)].stats, computed[(m, dataset)].refs) for m in methods]
        rows += [PaperRow(p + (TRANSDUCTIVE_MARK if is_transductive(p) else ""),
                          tuple(pub_of(p, dataset) or (None, None, None)), published=True) for p in pub_methods]
        blocks.append((dataset, rows))
    if with_average:
        rows = [PaperRow(labels[m], tuple(averages[m]), tuple(r.notes for r in layout_average_cells[m]))
                for m in methods]
        rows += [PaperRow(p, tuple(pub_average(p) or (None, None, None)), published=True) for p in pub_methods]
        blocks.append(("Average", rows))
    paper = PaperTable(["Method", *METRIC_LABELS], blocks, group_header="Dataset",
                       published_note=BASE2NEW_PUBLISHED_CITATION if pub_methods else "")
    pub_panels = {
        label: {f"{p} (published)": [pub_stats(pub_of(p, d))[i] for d in shown]
                + ([pub_stats(pub_average(p))[i]] if with_average else []) for p in pub_methods}
        for i, label in enumerate(METRIC_LABELS)
    } if pub_methods else {}
    return Table("base2new", shots, title, meta, layout.columns, layout.rows, notes.texts, layout.records,
                 Chart(title, shown + (["Average"] if with_average else []), panels, pub_panels), paper)


# ----------------------------------------------------------------------------- cross-dataset, DG
TRANSFER_CSV_COLUMNS = [
    "protocol", "shots", "trainer", "config", "dataset", "role",
    "acc_mean", "acc_std", "acc_n", "seeds_expected", "complete",
    "published_method", "pub_acc", "delta_acc", "notes",
]


def _transfer_published_note(protocol: str, published: TransferPublished, mapping: Mapping[str, str],
                             labels: Mapping[Method, str], pub_methods: Sequence[str]) -> str:
    renamed = [f"{labels[m]} with {mapping[m.trainer]}" for m in labels
               if m.trainer in mapping and mapping[m.trainer] != m.trainer]
    compared = f" ({'; '.join(renamed)})" if renamed else ""
    return (f"\n\nPub. = published accuracy{compared} (spotlighter/data/{TRANSFER_PUBLISHED_FILES[protocol]}: "
            f"{published.citation(pub_methods)}); Δ = ours − published; the published average is recomputed "
            "as the mean over the targets our average covers.")


def transfer_table(
    results: Sequence[Result],
    protocol: str,
    *,
    root: str | Path = "",
    shots: int | None = None,
    seeds: Sequence[int] | None = None,
    datasets: Sequence[str] | None = None,
    source: str = XD_SOURCE,
    published: TransferPublished | None = None,
    published_methods: Sequence[str] = (),
) -> Table:
    """The source (ImageNet unless ``source``), each target, and the average over complete targets
    (when there are several); one column per method, each followed by the published accuracy of the
    method it maps to and the difference (when ``published`` has numbers for the shown datasets)."""
    check_protocol(protocol)
    if protocol == "base2new":
        raise ValueError("transfer_table is for 'xd' and 'dg'; use base2new_table")
    shots = _single_shots(results, shots)
    index = _Index(results, root, protocol, shots, seeds, source)
    methods = [m for m in methods_of(results) if m in index.expected]
    labels = method_labels(methods, mark_transductive=protocol != "dg")
    canonical = (DG_TARGETS_BY_SOURCE if protocol == "dg" else XD_TARGETS_BY_SOURCE).get(source, ())
    targets = [d for d in datasets if d != source] if datasets else ordered_datasets(
        (r.dataset for r in results if r.role == ROLE_TARGET and r.shots == shots), canonical)
    shown = [source] + targets
    mapping, only = resolve_published_methods(published, methods, published_methods) if published else ({}, [])

    def pub_of(method: str | None, dataset: str) -> float | None:
        return published.get(method, dataset) if published and method else None

    compared = {m: mapping[m.trainer] for m in methods
                if m.trainer in mapping and any(pub_of(mapping[m.trainer], d) is not None for d in shown)}
    only = [p for p in only if any(pub_of(p, d) is not None for d in shown)]
    pub_methods = list(dict.fromkeys(list(compared.values()) + only))

    notes, records = Notes(), []
    stats: dict[tuple[Method, str], Stat] = {}
    complete: dict[tuple[Method, str], bool] = {}
    refs_of: dict[tuple[Method, str], tuple[int, ...]] = {}
    rows: list[list[Cell]] = []
    for dataset, role in [(source, ROLE_SOURCE)] + [(t, ROLE_TARGET) for t in targets]:
        row = [Cell(f"{dataset} (source)" if role == ROLE_SOURCE else dataset)]
        for m in methods:
            values, refs = index.values(m, dataset, role, notes)
            stat = stats[(m, dataset)] = summarize(list(values.values()))
            complete[(m, dataset)] = set(index.expected[m]) <= set(values)
            refs_of[(m, dataset)] = refs
            row.append(Cell(stat, refs))
            pub = pub_of(compared.get(m), dataset)
            delta = stat.mean - pub if stat.ok and pub is not None else None
            if m in compared:
                row += [Cell(pub), Cell(delta, signed=True)]
            records.append({"dataset": dataset, "role": role, "acc_mean": _round(stat.mean),
                            "acc_std": _round(stat.std), "acc_n": stat.n, "complete": complete[(m, dataset)],
                            "published_method": compared.get(m, ""), "pub_acc": _round(pub),
                            "delta_acc": _round(delta), "notes": _join(notes, refs),
                            **_method_fields(protocol, shots, m, index)})
        for method in only:
            row.append(Cell(pub_of(method, dataset)))
            records.append(_published_record(protocol, shots, method, dataset, role, pub_of(method, dataset)))
        rows.append(row)

    def pub_average(method: str, over: Sequence[str]) -> float | None:
        return published.average(method, over) if published and over else None

    def pub_targets(method: str) -> list[str]:
        return [t for t in targets if pub_of(method, t) is not None]

    average_row = [Cell(f"Average over targets ({len(targets)})")]
    average_stats: dict[Method, Stat] = {}
    average_refs: dict[Method, tuple[int, ...]] = {}
    average_records = []
    for m in methods:
        covered = [t for t in targets if complete[(m, t)]]
        excluded = [t for t in targets if t not in covered]
        refs = (notes.add(f"{labels[m]} average over complete targets only; excluded: {', '.join(excluded)}"),) \
            if excluded else ()
        mean = statistics.fmean(stats[(m, t)].mean for t in covered) if covered else None  # type: ignore[misc]
        average_stats[m], average_refs[m] = Stat(mean, None, len(covered)), refs
        average_row.append(Cell(mean, refs, suffix=f" ({len(covered)} of {len(targets)})"))
        pub = pub_average(compared[m], covered) if m in compared else None
        delta = mean - pub if mean is not None and pub is not None else None
        if m in compared:
            average_row += [Cell(pub), Cell(delta, signed=True)]
        average_records.append({"dataset": "average", "role": "average", "acc_mean": _round(mean), "acc_std": None,
                                "acc_n": None, "complete": not excluded, "published_method": compared.get(m, ""),
                                "pub_acc": _round(pub), "delta_acc": _round(delta), "notes": _join(notes, refs),
                                **_method_fields(protocol, shots, m, index)})
    for method in only:
        have = pub_targets(method)
        average_row.append(Cell(pub_average(method, have), suffix=f" ({len(have)} of {len(targets)})"))
        average_records.append(_published_record(protocol, shots, method, "average", "average",
                                                 pub_average(method, have)))
    with_average = len(targets) > 1  # an average over one target repeats its row
    if with_average:
        rows.append(average_row)
        records += average_records

    title = f"{PROTOCOL_TITLES[protocol]} ({shots} shots{'' if source == XD_SOURCE else ', source ' + source})"
    categories = shown + (["Average"] if with_average else [])
    series = {labels[m]: [stats[(m, d)] for d in shown] + ([average_stats[m]] if with_average else [])
              for m in methods}
    pub_series = {f"{p} (published)": [Stat(pub_of(p, d), None, 0) if pub_of(p, d) is not None else EMPTY
                                       for d in shown]
                  + ([Stat(pub_average(p, pub_targets(p)), None, 0) if pub_targets(p) else EMPTY]
                     if with_average else []) for p in pub_methods}
    columns = ["Dataset"]
    for m in methods:
        columns += [labels[m]] + ([f"Pub. {labels[m]}", f"Δ {labels[m]}"] if m in compared else [])
    columns += [f"{p} (published)" for p in only]
    meta = _meta(root, shots, index, seeds is not None)
    if published and pub_methods:
        meta += _transfer_published_note(protocol, published, mapping, {m: labels[m] for m in compared},
                                         pub_methods)

    # The paper layout leaves out the targets none of our rows has a value for (the Markdown lists them).
    paper_targets = [t for t in targets if any(stats[(m, t)].ok for m in methods)] or targets
    paper_shown = [source] + paper_targets
    paper_rows = [PaperRow(labels[m], tuple(stats[(m, d)] for d in paper_shown)
                           + ((average_stats[m],) if with_average else ()),
                           tuple(refs_of[(m, d)] for d in paper_shown) + ((average_refs[m],) if with_average else ()))
                  for m in methods]
    paper_rows += [PaperRow(p, tuple(pub_of(p, d) for d in paper_shown)
                            + ((pub_average(p, [t for t in paper_targets if pub_of(p, t) is not None]),)
                               if with_average else ()), published=True)
                   for p in pub_methods]
    paper = PaperTable(["Method", f"{source} (source)"] + paper_targets + (["Average"] if with_average else []),
                       [("", paper_rows)],
                       published_note=published.citation(pub_methods) if published and pub_methods else "")
    return Table(protocol, shots, title, meta, columns, rows, notes.texts, records,
                 Chart(title, categories, {"Accuracy": series}, {"Accuracy": pub_series} if pub_series else {}),
                 paper)


def _published_record(protocol: str, shots: int, method: str, dataset: str, role: str,
                      value: float | None) -> dict[str, object]:
    return {"protocol": protocol, "shots": shots, "trainer": f"{method} (published)", "config": "",
            "dataset": dataset, "role": role, "published_method": method, "pub_acc": _round(value),
            "notes": "published numbers only"}


def _method_fields(protocol: str, shots: int, m: Method, index: _Index) -> dict[str, object]:
    return {"protocol": protocol, "shots": shots, "trainer": m.trainer, "config": m.config,
            "seeds_expected": " ".join(map(str, index.expected[m]))}


def build_tables(
    results: Sequence[Result],
    protocol: str,
    *,
    root: str | Path = "",
    seeds: Sequence[int] | None = None,
    datasets: Sequence[str] | None = None,
    published: Published | TransferPublished | None = None,
    published_methods: Sequence[str] = (),
    source: str = XD_SOURCE,
) -> list[Table]:
    """One table per shot count found in ``results`` (xd/dg: runs trained on ``source``; fewshot: one
    accuracy-vs-shots table per dataset)."""
    check_protocol(protocol)
    if protocol == "fewshot":
        from .fewshot import fewshot_tables

        return fewshot_tables(results, root=root, seeds=seeds, datasets=datasets,
                              published=published)  # type: ignore[arg-type]
    tables = []
    for shots in sorted({r.shots for r in results}):
        if protocol == "base2new":
            tables.append(base2new_table(results, root=root, shots=shots, seeds=seeds, datasets=datasets,
                                         published=published,  # type: ignore[arg-type]
                                         published_methods=published_methods))
        else:
            tables.append(transfer_table(results, protocol, root=root, shots=shots, seeds=seeds, datasets=datasets,
                                         source=source, published=published,  # type: ignore[arg-type]
                                         published_methods=published_methods))
    return tables


# ----------------------------------------------------------------------------- rendering
def format_value(value: CellValue, *, signed: bool = False) -> str:
    """``76.52 ± 0.31 (3)`` for a Stat, ``+0.31`` for a signed float, ``—`` for nothing."""
    if value is None or (isinstance(value, Stat) and not value.ok):
        return MISSING_MARK
    if isinstance(value, Stat):
        std = f" ± {value.std:.{DECIMALS}f}" if value.std is not None else ""
        return f"{value.mean:.{DECIMALS}f}{std} ({value.n})"
    if isinstance(value, float):
        return f"{value:+.{DECIMALS}f}" if signed else f"{value:.{DECIMALS}f}"
    return str(value)


def format_cell(cell: Cell) -> str:
    text = format_value(cell.value, signed=cell.signed)
    if cell.value is not None and text != MISSING_MARK:
        text += cell.suffix
    return text + "".join(f" [{n}]" for n in cell.notes)


def _is_numeric_column(rows: Sequence[Sequence[Cell]], col: int) -> bool:
    return any(isinstance(r[col].value, (Stat, float)) for r in rows)


def to_markdown(table: Table) -> str:
    """The table as Markdown: a heading, the meta line, the table, numbered footnotes."""
    align = ["---:" if _is_numeric_column(table.rows, i) else "---" for i in range(len(table.columns))]
    lines = [f"## {table.title}", "", table.meta, "", "| " + " | ".join(table.columns) + " |",
             "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(format_cell(c) for c in row) + " |" for row in table.rows]
    if table.footnotes:
        lines.append("")
        lines += [f"[{i}] {text}" for i, text in enumerate(table.footnotes, 1)]
    return "\n".join(lines) + "\n"


def csv_columns(protocol: str) -> list[str]:
    if protocol == "fewshot":
        return FEWSHOT_CSV_COLUMNS
    return B2N_CSV_COLUMNS if protocol == "base2new" else TRANSFER_CSV_COLUMNS


def to_csv(tables: Sequence[Table]) -> str:
    """One CSV row per trainer × config × dataset (and per average) of every table."""
    if not tables:
        return ""
    columns = csv_columns(tables[0].protocol)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for table in tables:
        for record in table.records:
            writer.writerow(_csv_row(record, columns))
    return out.getvalue()


def csv_safe(value: object) -> object:
    """A string starting with ``= + - @`` (or tab / carriage return) gets a leading ``'`` so spreadsheets
    read it as text, not a formula (OWASP, CSV injection); numbers stay numbers."""
    if isinstance(value, str) and value.startswith(CSV_FORMULA_PREFIXES):
        return CSV_ESCAPE_PREFIX + value
    return value


def _csv_row(record: Mapping[str, object], columns: Sequence[str]) -> dict[str, object]:
    return {c: "" if record.get(c) is None else csv_safe(record.get(c)) for c in columns}
