"""Seed-averaged tables of the three protocols, as Markdown and CSV."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .constants import (
    BASE2NEW_DATASETS,
    DECIMALS,
    DG_TARGETS_BY_SOURCE,
    MISSING_MARK,
    PROTOCOL_TITLES,
    PUBLISHED_METHOD_FOR_TRAINER,
    ROLE_BASE,
    ROLE_NEW,
    ROLE_SOURCE,
    ROLE_TARGET,
    SEED_DIR_PREFIX,
    TRAINER_ORDER,
    XD_SOURCE,
    XD_TARGETS_BY_SOURCE,
)
from .layout import check_protocol, seed_dir_path
from .parse import Result
from .published import BaseNew, Published
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
    """Bars of one table: per panel, per series (method), one Stat per category (dataset)."""

    title: str
    categories: list[str]
    panels: dict[str, dict[str, list[Stat]]]


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


def method_labels(methods: Sequence[Method]) -> dict[Method, str]:
    """Trainer name, plus the config where a trainer appears with several configs."""
    configs = defaultdict(set)
    for m in methods:
        configs[m.trainer].add(m.config)
    return {m: m.trainer if len(configs[m.trainer]) == 1 else f"{m.trainer} ({m.config})" for m in methods}


def ordered_datasets(found: Iterable[str], canonical: Sequence[str]) -> list[str]:
    """Every ``canonical`` dataset (in order) once one of them is found, then any other found, alphabetically.

    A protocol's table thus shows its missing datasets as missing; a tree holding only non-canonical
    datasets (e.g. a synthetic one) shows just those.
    """
    found = set(found)
    listed = list(canonical) if found & set(canonical) else []
    return listed + sorted(found - set(canonical))


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
    published: Published, methods: Sequence[Method], extra: Sequence[str] = ()
) -> tuple[dict[str, str], list[str]]:
    """Trainer -> published method (default map plus ``TRAINER=Method`` items), and published-only methods.

    A plain name in ``extra`` that is also one of our trainers compares that trainer with it;
    otherwise its published rows are shown on their own.
    """
    mapping = {t: m for t, m in PUBLISHED_METHOD_FOR_TRAINER.items() if published.method_name(m)}
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
    """HM(mean Base, mean New) over ``rows``; Nones when there are none."""
    if not rows:
        return None, None, None
    base = statistics.fmean(r.stats[0].mean for r in rows)  # type: ignore[misc]
    new = statistics.fmean(r.stats[1].mean for r in rows)  # type: ignore[misc]
    return base, new, harmonic_mean(base, new)


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
        cells = [Cell(first), Cell(method.trainer)] + ([Cell(method.config)] if self.with_config else []) + list(ours)
        if self.with_pub:
            cells += _pub_cells(pub) + [Cell(d, signed=True) for d in deltas]
        self.rows.append(cells)
        record.update(protocol="base2new", shots=self.shots, trainer=method.trainer, config=method.config,
                      published_method=pub_method or "")
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
    shown = list(datasets) if datasets else ordered_datasets(
        (r.dataset for r in results if r.shots == shots), BASE2NEW_DATASETS)
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
    with_average = len(shown) > 1  # an average over one dataset repeats its row
    for m in methods if with_average else ():
        covered = [d for d in shown if computed[(m, d)].complete]
        excluded = [d for d in shown if d not in covered]
        refs = (notes.add(f"{labels[m]} average: HM(mean Base, mean New) over complete datasets only; "
                          f"excluded: {', '.join(excluded)}"),) if excluded else ()
        values = _average_of([computed[(m, d)] for d in covered])
        averages[m] = [Stat(v, None, len(covered)) for v in values]
        pub_method = mapping.get(m.trainer)
        pub = published.average(pub_method, covered) if published and pub_method and covered else None
        record = {"dataset": "average", "seeds_expected": " ".join(map(str, index.expected[m])),
                  "complete": not excluded, "notes": _join(notes, refs),
                  **{f"{k}_mean": _round(v) for k, v in zip(METRICS, values, strict=True)}}
        layout.add(f"Average ({len(covered)} of {len(shown)} datasets)", m, [Cell(v, refs) for v in values], values,
                   pub_method, pub, record)
    for method in only if with_average else ():
        have = [d for d in shown if pub_of(method, d)]
        pub = published.average(method, have) if published and have else None
        layout.add(f"Average ({len(have)} of {len(shown)} datasets)", Method(f"{method} (published)", MISSING_MARK),
                   _pub_cells(pub), (None, None, None), None, None,
                   {"dataset": "average", "notes": "published numbers only"})

    title = f"{PROTOCOL_TITLES['base2new']} ({shots} shots)"
    panels = {
        label: {labels[m]: [computed[(m, d)].stats[i] for d in shown] + ([averages[m][i]] if with_average else [])
                for m in methods}
        for i, label in enumerate(METRIC_LABELS)
    }
    meta = _meta(root, shots, index, seeds is not None) + (PUBLISHED_NOTE if with_pub else "")
    return Table("base2new", shots, title, meta, layout.columns, layout.rows, notes.texts, layout.records,
                 Chart(title, shown + (["Average"] if with_average else []), panels))


# ----------------------------------------------------------------------------- cross-dataset, DG
TRANSFER_CSV_COLUMNS = [
    "protocol", "shots", "trainer", "config", "dataset", "role",
    "acc_mean", "acc_std", "acc_n", "seeds_expected", "complete", "notes",
]


def transfer_table(
    results: Sequence[Result],
    protocol: str,
    *,
    root: str | Path = "",
    shots: int | None = None,
    seeds: Sequence[int] | None = None,
    datasets: Sequence[str] | None = None,
    source: str = XD_SOURCE,
) -> Table:
    """The source (ImageNet unless ``source``), each target, and the average over complete targets
    (when there are several); one column per method."""
    check_protocol(protocol)
    if protocol == "base2new":
        raise ValueError("transfer_table is for 'xd' and 'dg'; use base2new_table")
    shots = _single_shots(results, shots)
    index = _Index(results, root, protocol, shots, seeds, source)
    methods = [m for m in methods_of(results) if m in index.expected]
    labels = method_labels(methods)
    canonical = (DG_TARGETS_BY_SOURCE if protocol == "dg" else XD_TARGETS_BY_SOURCE).get(source, ())
    targets = [d for d in datasets if d != source] if datasets else ordered_datasets(
        (r.dataset for r in results if r.role == ROLE_TARGET and r.shots == shots), canonical)
    notes, records = Notes(), []
    stats: dict[tuple[Method, str], Stat] = {}
    complete: dict[tuple[Method, str], bool] = {}
    rows: list[list[Cell]] = []
    for dataset, role in [(source, ROLE_SOURCE)] + [(t, ROLE_TARGET) for t in targets]:
        row = [Cell(f"{dataset} (source)" if role == ROLE_SOURCE else dataset)]
        for m in methods:
            values, refs = index.values(m, dataset, role, notes)
            stat = stats[(m, dataset)] = summarize(list(values.values()))
            complete[(m, dataset)] = set(index.expected[m]) <= set(values)
            row.append(Cell(stat, refs))
            records.append({"dataset": dataset, "role": role, "acc_mean": _round(stat.mean),
                            "acc_std": _round(stat.std), "acc_n": stat.n, "complete": complete[(m, dataset)],
                            "notes": _join(notes, refs), **_method_fields(protocol, shots, m, index)})
        rows.append(row)
    average_row = [Cell(f"Average over targets ({len(targets)})")]
    average_stats = []
    for m in methods:
        covered = [t for t in targets if complete[(m, t)]]
        excluded = [t for t in targets if t not in covered]
        refs = (notes.add(f"{labels[m]} average over complete targets only; excluded: {', '.join(excluded)}"),) \
            if excluded else ()
        mean = statistics.fmean(stats[(m, t)].mean for t in covered) if covered else None  # type: ignore[misc]
        average_stats.append(Stat(mean, None, len(covered)))
        average_row.append(Cell(mean, refs, suffix=f" ({len(covered)} of {len(targets)})"))
        records.append({"dataset": "average", "role": "average", "acc_mean": _round(mean), "acc_std": None,
                        "acc_n": None, "complete": not excluded, "notes": _join(notes, refs),
                        **_method_fields(protocol, shots, m, index)})
    with_average = len(targets) > 1  # an average over one target repeats its row
    if with_average:
        rows.append(average_row)
    else:
        records = [r for r in records if r["dataset"] != "average"]
    title = f"{PROTOCOL_TITLES[protocol]} ({shots} shots{'' if source == XD_SOURCE else ', source ' + source})"
    categories = [source] + targets + (["Average"] if with_average else [])
    series = {labels[m]: [stats[(m, d)] for d in [source] + targets] + ([average_stats[i]] if with_average else [])
              for i, m in enumerate(methods)}
    return Table(protocol, shots, title, _meta(root, shots, index, seeds is not None),
                 ["Dataset"] + [labels[m] for m in methods], rows, notes.texts, records,
                 Chart(title, categories, {"Accuracy": series}))


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
    published: Published | None = None,
    published_methods: Sequence[str] = (),
    source: str = XD_SOURCE,
) -> list[Table]:
    """One table per shot count found in ``results`` (xd/dg: runs trained on ``source``)."""
    check_protocol(protocol)
    tables = []
    for shots in sorted({r.shots for r in results}):
        if protocol == "base2new":
            tables.append(base2new_table(results, root=root, shots=shots, seeds=seeds, datasets=datasets,
                                         published=published, published_methods=published_methods))
        else:
            tables.append(transfer_table(results, protocol, root=root, shots=shots, seeds=seeds, datasets=datasets,
                                         source=source))
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


def _csv_row(record: Mapping[str, object], columns: Sequence[str]) -> dict[str, object]:
    return {c: "" if record.get(c) is None else record.get(c) for c in columns}
