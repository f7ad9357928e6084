"""The published numbers shipped in ``spotlighter/data`` (see each file's header for sources and caveats):
base-to-novel Base/New/HM, and cross-dataset / domain-generalisation accuracies."""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, NamedTuple

from .constants import FEWSHOT_PUBLISHED_FILE, PUBLISHED_AVERAGE_ROW, PUBLISHED_FILE, TRANSFER_PUBLISHED_FILES
from .stats import harmonic_mean


class BaseNew(NamedTuple):
    """Base, New and HM accuracies (%)."""

    base: float
    new: float
    hm: float


@dataclass(frozen=True)
class Published:
    """Published rows keyed by (method, dataset); the printed "average" rows are kept apart."""

    rows: dict[tuple[str, str], BaseNew]
    printed_average: dict[str, BaseNew]

    @property
    def methods(self) -> list[str]:
        """Methods in file order."""
        return list(dict.fromkeys(method for method, _ in self.rows))

    def method_name(self, name: str) -> str | None:
        """The method spelled as in the file (case-insensitive match), or None."""
        return next((m for m in self.methods if m.lower() == name.lower()), None)

    def get(self, method: str, dataset: str) -> BaseNew | None:
        return self.rows.get((method, dataset))

    def average(self, method: str, datasets: Iterable[str]) -> BaseNew | None:
        """HM(mean Base, mean New) over ``datasets``; None when one of them has no published row."""
        rows = [self.get(method, d) for d in datasets]
        if not rows or any(r is None for r in rows):
            return None
        base = statistics.fmean(r.base for r in rows)  # type: ignore[union-attr]
        new = statistics.fmean(r.new for r in rows)  # type: ignore[union-attr]
        return BaseNew(base, new, harmonic_mean(base, new))

    def mean_of_hms(self, method: str, datasets: Iterable[str]) -> BaseNew | None:
        """Mean Base, mean New and the mean of the per-dataset HMs over ``datasets``; None when one of
        them has no published row."""
        rows = [self.get(method, d) for d in datasets]
        if not rows or any(r is None for r in rows):
            return None
        return BaseNew(*(statistics.fmean(r[i] for r in rows) for i in range(3)))  # type: ignore[index]


def _csv_body(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def parse_published(text: str) -> Published:
    """Parse the CSV text (``#`` lines are comments)."""
    body = _csv_body(text)
    rows: dict[tuple[str, str], BaseNew] = {}
    averages: dict[str, BaseNew] = {}
    for row in csv.DictReader(io.StringIO(body)):
        values = BaseNew(float(row["base"]), float(row["new"]), float(row["hm"]))
        if row["dataset"] == PUBLISHED_AVERAGE_ROW:
            averages[row["method"]] = values
        else:
            rows[(row["method"], row["dataset"])] = values
    return Published(rows, averages)


def load_published(path: str | Path | None = None) -> Published:
    """Load ``path``, or the CSV shipped with the package."""
    if path is not None:
        return parse_published(Path(path).read_text(encoding="utf-8"))
    shipped = resources.files("spotlighter") / "data" / PUBLISHED_FILE
    return parse_published(shipped.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class TransferPublished:
    """Published cross-dataset or DG accuracies keyed by (method, dataset), where each row comes from
    (``sources``), and the printed "average" rows kept apart."""

    protocol: str
    rows: dict[tuple[str, str], float]
    sources: dict[str, str]
    printed_average: dict[str, float]

    @property
    def methods(self) -> list[str]:
        """Methods in file order."""
        return list(dict.fromkeys(method for method, _ in self.rows))

    def method_name(self, name: str) -> str | None:
        """The method spelled as in the file (case-insensitive match), or None."""
        return next((m for m in self.methods if m.lower() == name.lower()), None)

    def get(self, method: str, dataset: str) -> float | None:
        return self.rows.get((method, dataset))

    def average(self, method: str, datasets: Iterable[str]) -> float | None:
        """Mean over ``datasets``; None when one of them has no published row."""
        values = [self.get(method, d) for d in datasets]
        if not values or any(v is None for v in values):
            return None
        return statistics.fmean(values)  # type: ignore[arg-type]

    def citation(self, methods: Iterable[str]) -> str:
        """"CoOp, CoCoOp: CoCoOp (CVPR 2022) Table 2; MaPLe: ..." for ``methods`` (file order of sources)."""
        by_source: dict[str, list[str]] = {}
        for method in self.methods:
            if method in set(methods):
                by_source.setdefault(self.sources[method], []).append(method)
        return "; ".join(f"{', '.join(ms)}: {source}" for source, ms in by_source.items())


def parse_transfer_published(text: str, protocol: str) -> TransferPublished:
    """Parse a ``method,dataset,accuracy,source`` CSV text (``#`` lines are comments)."""
    rows: dict[tuple[str, str], float] = {}
    sources: dict[str, str] = {}
    averages: dict[str, float] = {}
    for row in csv.DictReader(io.StringIO(_csv_body(text))):
        value = float(row["accuracy"])
        sources.setdefault(row["method"], row["source"])
        if row["dataset"] == PUBLISHED_AVERAGE_ROW:
            averages[row["method"]] = value
        else:
            rows[(row["method"], row["dataset"])] = value
    return TransferPublished(protocol, rows, sources, averages)


def load_transfer_published(protocol: str, path: str | Path | None = None) -> TransferPublished:
    """Load ``path``, or the table of ``protocol`` ('xd' or 'dg') shipped with the package."""
    if path is not None:
        return parse_transfer_published(Path(path).read_text(encoding="utf-8"), protocol)
    if protocol not in TRANSFER_PUBLISHED_FILES:
        raise ValueError(f"no published transfer table for protocol {protocol!r}; "
                         f"known: {', '.join(TRANSFER_PUBLISHED_FILES)}")
    shipped = resources.files("spotlighter") / "data" / TRANSFER_PUBLISHED_FILES[protocol]
    return parse_transfer_published(shipped.read_text(encoding="utf-8"), protocol)


@dataclass(frozen=True)
class FewShotPoint:
    """One published few-shot accuracy: its backbone and where it is printed."""

    accuracy: float
    backbone: str
    source: str


@dataclass(frozen=True)
class FewShotPublished:
    """Published few-shot accuracies keyed by (method, dataset, shots); shots 0 is a zero-shot model."""

    rows: dict[tuple[str, str, int], FewShotPoint]

    @property
    def methods(self) -> list[str]:
        """Methods in file order."""
        return list(dict.fromkeys(method for method, _, _ in self.rows))

    def of(self, method: str, dataset: str) -> dict[int, FewShotPoint]:
        """shots -> point of one method on one dataset (empty when the file has none)."""
        return {k: p for (m, d, k), p in self.rows.items() if m == method and d == dataset}

    def citation(self, methods: Iterable[str], dataset: str) -> str:
        """"CoOp (ViT-B/16): CoCoOp (CVPR 2022) Table 3; ..." for the rows of ``dataset``."""
        parts: dict[str, None] = {}
        for (m, d, _), p in self.rows.items():
            if d == dataset and m in set(methods):
                parts[f"{m} ({p.backbone}): {p.source}"] = None
        return "; ".join(parts)


FEWSHOT_COLUMNS = ("method", "dataset", "shots", "accuracy", "backbone", "source")


def parse_fewshot_published(text: str, where: str = FEWSHOT_PUBLISHED_FILE) -> FewShotPublished:
    """Parse a ``method,dataset,shots,accuracy,backbone,source`` CSV text (``#`` lines are comments);
    ValueError naming ``where``, the line and the column for a bad row."""
    reader = csv.DictReader(io.StringIO(_csv_body(text)))
    missing = [c for c in FEWSHOT_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)}; expected {','.join(FEWSHOT_COLUMNS)}")
    rows: dict[tuple[str, str, int], FewShotPoint] = {}
    for n, row in enumerate(reader, 2):
        try:
            shots, value = int(row["shots"]), float(row["accuracy"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: data row {n - 1}: shots must be an integer >= 0 and accuracy a number "
                             f"(got shots={row['shots']!r}, accuracy={row['accuracy']!r})") from None
        if shots < 0 or not 0.0 <= value <= 100.0:
            raise ValueError(f"{where}: data row {n - 1}: shots must be >= 0 and accuracy within 0-100 "
                             f"(got shots={shots}, accuracy={value})")
        rows[(row["method"], row["dataset"], shots)] = FewShotPoint(value, row["backbone"], row["source"])
    return FewShotPublished(rows)


def load_fewshot_published(path: str | Path | None = None) -> FewShotPublished:
    """Load ``path``, or the few-shot table shipped with the package."""
    if path is not None:
        return parse_fewshot_published(Path(path).read_text(encoding="utf-8"), str(path))
    shipped = resources.files("spotlighter") / "data" / FEWSHOT_PUBLISHED_FILE
    return parse_fewshot_published(shipped.read_text(encoding="utf-8"))


def load_protocol_published(protocol: str) -> Published | TransferPublished | FewShotPublished:
    """The shipped published numbers of ``protocol``."""
    if protocol == "fewshot":
        return load_fewshot_published()
    return load_published() if protocol == "base2new" else load_transfer_published(protocol)
