"""CoOp's few-shot protocol: per dataset, the accuracy-vs-shots table (rows: shots, columns: methods)
and its curve (:class:`Curve`, drawn by ``plot.py``). A model trained K shots lives in
``<cfg>_<K>shots``; a zero-shot model's one evaluation in ``<cfg>_0shots`` (``output_tree``), shown
in every row and drawn as a flat line."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .. import registry
from ..output_tree import ZERO_SHOT_SHOTS
from .constants import FEWSHOT_CSV_COLUMNS
from .layout import seed_dir_path
from .parse import Result
from .published import FewShotPublished
from .stats import EMPTY, Stat, summarize
from .tables import Cell, Method, Notes, PaperRow, PaperTable, Table, method_labels, methods_of, ordered_datasets

PUBLISHED_LABEL = "{method} (published, {backbone})"
ZERO_SHOT_LABEL = " (zero-shot)"


@dataclass
class Curve:
    """Accuracy vs shots on one dataset: per method one Stat per shot count (``flat``: zero-shot methods,
    the same value at every shot count), and the published points, per label, shot -> accuracy."""

    title: str
    dataset: str
    shots: list[int]
    series: dict[str, list[Stat]]
    flat: set[str] = field(default_factory=set)
    published: dict[str, dict[int, float]] = field(default_factory=dict)


def _is_zero_shot(runs: dict[int, dict[int, Result]]) -> bool:
    return set(runs) == {ZERO_SHOT_SHOTS}


def fewshot_tables(results: Sequence[Result], *, root: str | Path = "", seeds: Sequence[int] | None = None,
                   datasets: Sequence[str] | None = None, published: FewShotPublished | None = None) -> list[Table]:
    """One table per dataset found in ``results`` (or named in ``datasets``)."""
    found = {r.dataset for r in results}
    names = [d for d in (datasets or ordered_datasets(found, registry.BASE2NEW_DATASETS)) if d in found]
    return [fewshot_table([r for r in results if r.dataset == d], d, root=root, seeds=seeds, published=published)
            for d in names]


def fewshot_table(results: Sequence[Result], dataset: str, *, root: str | Path = "",
                  seeds: Sequence[int] | None = None, published: FewShotPublished | None = None) -> Table:
    """Rows: the registry's shot counts and any other trained one; columns: our methods (mean ± sample
    std over seeds), then published methods with numbers for ``dataset``."""
    notes = Notes()
    runs: dict[Method, dict[int, dict[int, Result]]] = defaultdict(lambda: defaultdict(dict))
    for r in results:
        runs[Method(r.trainer, r.config)][r.shots][r.seed] = r
    methods = methods_of(results)
    labels = method_labels(methods, mark_transductive=False)
    zero = {m for m in methods if _is_zero_shot(runs[m])}
    labels = {m: labels[m] + (ZERO_SHOT_LABEL if m in zero else "") for m in methods}
    trained_shots = {k for m in methods if m not in zero for k in runs[m] if k != ZERO_SHOT_SHOTS}
    shots = sorted(set(registry.FEWSHOT_SHOTS) | trained_shots)

    stats: dict[tuple[Method, int], Stat] = {}
    refs: dict[tuple[Method, int], tuple[int, ...]] = {}
    complete: dict[tuple[Method, int], bool] = {}
    expected: dict[Method, list[int]] = {}
    for m in methods:
        found_seeds = sorted({s for by_seed in runs[m].values() for s in by_seed})
        # a zero-shot model is evaluated once (its seed changes nothing): only its own seeds are expected
        expected[m] = found_seeds if m in zero or not seeds else sorted(seeds)
        for k in shots:
            by_seed = runs[m].get(ZERO_SHOT_SHOTS if m in zero else k, {})
            values = [by_seed[s].accuracy for s in expected[m] if s in by_seed and by_seed[s].accuracy is not None]
            cell_refs = [notes.add(f"{m.trainer}/{m.config} {k} shots seed {s}: {by_seed[s].reason}")
                         for s in expected[m] if s in by_seed and by_seed[s].reason]
            absent = [s for s in expected[m] if s not in by_seed]
            if absent:
                where = seed_dir_path(root, "fewshot", m.trainer, m.config, dataset, "", k, absent[0]).parent
                cell_refs.append(notes.add(f"{m.trainer}/{m.config} {k} shots: seed(s) "
                                           f"{', '.join(map(str, absent))} missing (no folder in {where})"))
            stats[(m, k)] = summarize(values) if values else EMPTY
            refs[(m, k)] = tuple(cell_refs)
            complete[(m, k)] = len(values) == len(expected[m])

    pub_methods: list[str] = []
    pub_points: dict[str, dict[int, float]] = {}
    pub_labels: dict[str, str] = {}
    if published is not None:
        for method in published.methods:
            points = published.of(method, dataset)
            if not points:
                continue
            backbone = next(iter(points.values())).backbone
            label = PUBLISHED_LABEL.format(method=method, backbone=backbone)
            pub_methods.append(method)
            pub_labels[method] = label
            pub_points[label] = {k: p.accuracy for k, p in points.items()}

    def pub_value(label: str, k: int) -> float | None:
        points = pub_points[label]
        return points.get(ZERO_SHOT_SHOTS) if set(points) == {ZERO_SHOT_SHOTS} else points.get(k)

    columns = ["Shots"] + [labels[m] for m in methods] + [pub_labels[p] for p in pub_methods]
    rows = [[Cell(str(k))] + [Cell(stats[(m, k)], refs[(m, k)]) for m in methods]
            + [Cell(pub_value(pub_labels[p], k)) for p in pub_methods] for k in shots]

    records: list[dict[str, object]] = []
    for m in methods:
        for k in shots:
            s = stats[(m, k)]
            records.append({"protocol": "fewshot", "dataset": dataset, "shots": k, "trainer": m.trainer,
                            "config": m.config, "acc_mean": _round(s.mean), "acc_std": _round(s.std),
                            "acc_n": s.n, "seeds_expected": " ".join(map(str, expected[m])),
                            "complete": complete[(m, k)], "zero_shot": m in zero,
                            "notes": "; ".join(notes.texts[i - 1] for i in refs[(m, k)])})
    for p in pub_methods:
        for k in shots:
            value = pub_value(pub_labels[p], k)
            if value is not None:
                point = published.of(p, dataset)  # type: ignore[union-attr]
                first = point.get(k) or point.get(ZERO_SHOT_SHOTS)
                records.append({"protocol": "fewshot", "dataset": dataset, "shots": k, "trainer": f"{p} (published)",
                                "published_method": p, "pub_acc": value, "pub_backbone": first.backbone if first else "",
                                "notes": "published numbers only"})

    paper_rows = [PaperRow(labels[m], tuple(stats[(m, k)] for k in shots), tuple(refs[(m, k)] for k in shots))
                  for m in methods]
    paper_rows += [PaperRow(pub_labels[p], tuple(pub_value(pub_labels[p], k) for k in shots), published=True)
                   for p in pub_methods]
    citation = published.citation(pub_methods, dataset) if published and pub_methods else ""
    paper = PaperTable(["Method"] + [f"{k}-shot" for k in shots], [("", paper_rows)], published_note=citation)

    trained_seeds = {s for m in methods if m not in zero for s in expected[m]}
    seeds_text = ", ".join(map(str, sorted(trained_seeds or {s for m in zero for s in expected[m]})))
    zero_text = " · zero-shot: one evaluation, the same in every row" if zero else ""
    meta = (f"root: `{root}` · dataset: {dataset} · all classes, trained on K images per class, tested on the "
            f"test set at the end of training · seeds: {seeds_text}{zero_text} · cells: mean ± sample std over "
            "seeds (seed count)" + (f" · published: {citation}" if citation else ""))
    title = f"{registry.PROTOCOLS['fewshot'].title}: {dataset}"
    curve = Curve(title, dataset, shots, {labels[m]: [stats[(m, k)] for k in shots] for m in methods},
                  {labels[m] for m in zero}, pub_points)
    return Table("fewshot", 0, title, meta, columns, rows, notes.texts, records, None, paper, curve)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


__all__ = ["Curve", "FEWSHOT_CSV_COLUMNS", "fewshot_table", "fewshot_tables"]
