"""Seed statistics: mean, sample standard deviation, harmonic mean of Base and New."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Stat:
    """Mean and sample std (n - 1) of per-seed values; std is None below two values."""

    mean: float | None
    std: float | None
    n: int

    @property
    def ok(self) -> bool:
        return self.mean is not None


EMPTY = Stat(None, None, 0)


def summarize(values: Sequence[float]) -> Stat:
    """Mean and sample standard deviation of ``values``."""
    if not values:
        return EMPTY
    std = statistics.stdev(values) if len(values) > 1 else None
    return Stat(statistics.fmean(values), std, len(values))


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2BN / (B + N), 0 when both are 0."""
    return 2.0 * base * new / (base + new) if base + new else 0.0
