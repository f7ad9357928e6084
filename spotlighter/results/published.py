"""The published base-to-novel numbers shipped in ``spotlighter/data`` (see its header caveats)."""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, NamedTuple

from .constants import PUBLISHED_AVERAGE_ROW, PUBLISHED_FILE
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


def parse_published(text: str) -> Published:
    """Parse the CSV text (``#`` lines are comments)."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
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
