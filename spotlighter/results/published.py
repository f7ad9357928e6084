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

from .constants import PUBLISHED_AVERAGE_ROW, PUBLISHED_FILE, TRANSFER_PUBLISHED_FILES
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


def load_protocol_published(protocol: str) -> Published | TransferPublished:
    """The shipped published numbers of ``protocol``."""
    return load_published() if protocol == "base2new" else load_transfer_published(protocol)
