"""PNG bar charts of the tables (matplotlib is an optional dependency: ``pip install -e .[plot]``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .constants import PLOT_HINT
from .tables import Chart, Table

PNG_SUFFIX = ".png"
BAR_GROUP_WIDTH = 0.8
PANEL_SIZE_IN = (10.0, 3.2)  # width and height of one panel, inches
DPI = 100


class PlotUnavailable(RuntimeError):
    """matplotlib cannot be imported."""


def figure_class() -> Any:
    """matplotlib's Figure (no pyplot, no global backend); PlotUnavailable when missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotUnavailable(PLOT_HINT) from exc
    return Figure


def plot_paths(target: str | Path, tables: Sequence[Table]) -> list[Path]:
    """``target`` itself for one table and a ``.png`` target; else one file per table in it or beside it."""
    target = Path(target)
    names = [f"{t.protocol}_{t.shots}shots{PNG_SUFFIX}" for t in tables]
    if target.suffix.lower() != PNG_SUFFIX:
        return [target / name for name in names]
    if len(tables) == 1:
        return [target]
    return [target.with_name(f"{target.stem}_{t.shots}shots{PNG_SUFFIX}") for t in tables]


def draw_chart(chart: Chart, path: str | Path) -> Path:
    """Grouped bars (one group per category, one bar per series, sample std as error bars)."""
    figure = figure_class()(figsize=(PANEL_SIZE_IN[0], PANEL_SIZE_IN[1] * len(chart.panels)), dpi=DPI)
    positions = range(len(chart.categories))
    for i, (panel, series) in enumerate(chart.panels.items()):
        axes = figure.add_subplot(len(chart.panels), 1, i + 1)
        width = BAR_GROUP_WIDTH / max(len(series), 1)
        for j, (label, stats) in enumerate(series.items()):
            heights = [s.mean if s.mean is not None else math.nan for s in stats]
            errors = [s.std if s.std is not None else 0.0 for s in stats]
            offsets = [p - BAR_GROUP_WIDTH / 2 + (j + 0.5) * width for p in positions]
            axes.bar(offsets, heights, width, yerr=errors, label=label, capsize=2)
        axes.set_ylabel(f"{panel} (%)")
        axes.set_xticks(list(positions))
        axes.set_xticklabels(chart.categories, rotation=30, ha="right", fontsize="small")
        if i == 0:  # one legend, outside the bars
            axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.suptitle(chart.title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def plot_tables(target: str | Path, tables: Sequence[Table]) -> list[Path]:
    """Write one PNG per table; return their paths."""
    return [draw_chart(t.chart, p) for t, p in zip(tables, plot_paths(target, tables), strict=True) if t.chart]
