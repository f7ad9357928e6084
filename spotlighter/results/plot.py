"""PNG bar charts of the tables, and the few-shot protocol's accuracy-vs-shots curve (matplotlib is an
optional dependency: ``pip install -e .[plot]``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .constants import PLOT_HINT
from .stats import Stat
from .tables import Chart, Table

PNG_SUFFIX = ".png"
BAR_GROUP_WIDTH = 0.8
PANEL_SIZE_IN = (10.0, 3.2)  # width and height of one panel, inches
DPI = 100
ZOOM_MARGIN = 0.12  # share of the data's span added below and above it on the value axis
VALUE_FONT_SIZE = 7
PUBLISHED_HATCH = "//"  # published bars: hatched, no error bar
PUBLISHED_ALPHA = 0.45
PUBLISHED_SUFFIX = " (published)"
# The few-shot curve: accuracy vs shots on a log2 axis, one line per method with a ± std band.
CURVE_SIZE_IN = (6.4, 4.2)  # width and height, inches (at DPI: 640 × 420 pixels)
CURVE_BAND_ALPHA = 0.2
CURVE_LINE_STYLE = "-"
PUBLISHED_LINE_STYLE = "--"


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
    keys = [f"{t.curve.dataset}" if t.curve is not None else f"{t.shots}shots" for t in tables]  # type: ignore[attr-defined]
    names = [f"{t.protocol}_{key}{PNG_SUFFIX}" for t, key in zip(tables, keys)]
    if target.suffix.lower() != PNG_SUFFIX:
        return [target / name for name in names]
    if len(tables) == 1:
        return [target]
    return [target.with_name(f"{target.stem}_{key}{PNG_SUFFIX}") for key in keys]


def _delta_series(series: dict[str, list[Stat]], reference: str) -> dict[str, list[Stat]] | None:
    """Each series minus the ``reference`` series' means (its own std kept); None without reference."""
    ref = next((v for k, v in series.items() if not k.endswith(PUBLISHED_SUFFIX)
                and (k == reference or k.startswith(reference + " ("))), None)
    if ref is None:
        return None
    out = {}
    for label, stats in series.items():
        if stats is ref:
            continue
        out[label] = [Stat(s.mean - r.mean, s.std, s.n) if s.ok and r.ok else Stat(None, None, 0)
                      for s, r in zip(stats, ref, strict=True)]
    return out


def value_limits(series: dict[str, list[Stat]], deltas: bool) -> tuple[float, float]:
    """A value axis zoomed to the bars and their error bars (so 1-2 point gaps are visible); deltas
    always include 0."""
    lows, highs = [], []
    for stats in series.values():
        for s in stats:
            if s.ok:
                err = s.std or 0.0
                lows.append(s.mean - err)  # type: ignore[operator]
                highs.append(s.mean + err)  # type: ignore[operator]
    if not lows:
        return (0.0, 1.0)
    lo, hi = min(lows), max(highs)
    if deltas:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    span = max(hi - lo, 1.0)
    lo, hi = lo - ZOOM_MARGIN * span, hi + ZOOM_MARGIN * span
    if not deltas:
        lo, hi = max(lo, 0.0), min(hi, 100.0 + ZOOM_MARGIN * span)
    return lo, hi


def draw_chart(chart: Chart, path: str | Path, deltas_to: str | None = None, published: bool = False) -> Path:
    """Grouped bars (one group per category, one bar per series) with mean ± sample std error bars and
    the value on each bar, on a value axis zoomed to the data; with ``deltas_to`` (a trainer, e.g.
    ZeroshotCLIP) each bar is the difference to that trainer's mean instead. ``published``: the chart's
    published numbers are drawn too, as hatched bars after ours."""
    figure = figure_class()(figsize=(PANEL_SIZE_IN[0], PANEL_SIZE_IN[1] * len(chart.panels)), dpi=DPI)
    positions = range(len(chart.categories))
    for i, (panel, ours) in enumerate(chart.panels.items()):
        series = {**ours, **(chart.published.get(panel, {}) if published else {})}
        axes = figure.add_subplot(len(chart.panels), 1, i + 1)
        shown = _delta_series(series, deltas_to) if deltas_to else None
        deltas = shown is not None
        shown = shown if deltas else series
        width = BAR_GROUP_WIDTH / max(len(shown), 1)
        for j, (label, stats) in enumerate(shown.items()):
            heights = [s.mean if s.mean is not None else math.nan for s in stats]
            errors = [s.std if s.std is not None else 0.0 for s in stats]
            offsets = [p - BAR_GROUP_WIDTH / 2 + (j + 0.5) * width for p in positions]
            style = {"hatch": PUBLISHED_HATCH, "alpha": PUBLISHED_ALPHA} if label.endswith(PUBLISHED_SUFFIX) else {}
            bars = axes.bar(offsets, heights, width, yerr=errors, label=label, capsize=2, **style)
            fmt = "%+.1f" if deltas else "%.1f"
            axes.bar_label(bars, labels=["" if math.isnan(h) else fmt % h for h in heights],
                           fontsize=VALUE_FONT_SIZE, padding=2)
        axes.set_ylim(*value_limits(shown, deltas))
        if deltas:
            axes.axhline(0.0, color="black", linewidth=0.8)
            axes.set_ylabel(f"{panel}: Δ to {deltas_to} (points)")
        else:
            axes.set_ylabel(f"{panel} (%)")
        axes.set_xticks(list(positions))
        axes.set_xticklabels(chart.categories, rotation=30, ha="right", fontsize="small")
        if i == 0:  # one legend, outside the bars
            axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.suptitle(chart.title + ("" if not deltas_to else f" — difference to {deltas_to}")
                    + "; error bars: sample std over seeds")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def draw_curve(curve: Any, path: str | Path, published: bool = False) -> Path:
    """The few-shot curve (:class:`spotlighter.results.fewshot.Curve`): accuracy vs shots on a log2 x
    axis, one solid line per method with a mean ± sample std band (a zero-shot method: a flat dashed-dotted
    line); ``published``: the published points as dashed lines (a published zero-shot number: flat)."""
    figure = figure_class()(figsize=CURVE_SIZE_IN, dpi=DPI)
    axes = figure.add_subplot(1, 1, 1)
    xs = list(curve.shots)
    for label, stats in curve.series.items():
        means = [s.mean if s.mean is not None else math.nan for s in stats]
        stds = [s.std if s.std is not None else 0.0 for s in stats]
        flat = label in curve.flat
        line, = axes.plot(xs, means, "-." if flat else CURVE_LINE_STYLE, marker=None if flat else "o",
                          label=label)
        axes.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                          color=line.get_color(), alpha=CURVE_BAND_ALPHA, linewidth=0)
    if published:
        for label, points in curve.published.items():
            if set(points) == {0}:
                axes.plot(xs, [points[0]] * len(xs), PUBLISHED_LINE_STYLE, label=label)
            else:
                shown = sorted(k for k in points if k in xs)
                axes.plot(shown, [points[k] for k in shown], PUBLISHED_LINE_STYLE, marker="s", fillstyle="none",
                          label=label)
    axes.set_xscale("log", base=2)
    axes.set_xticks(xs)
    axes.set_xticklabels([str(k) for k in xs])
    axes.set_xlabel("labelled training images per class (shots)")
    axes.set_ylabel("test accuracy (%)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", loc="best")
    banded = any(s.std is not None for stats in curve.series.values() for s in stats)
    axes.set_title(curve.title + ("\nband: ± sample std over seeds" if banded else "\none seed per point (no std band)"),
                   fontsize="medium")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")  # the figure's own size: CURVE_SIZE_IN × DPI pixels
    return path


def plot_tables(target: str | Path, tables: Sequence[Table], deltas_to: str | None = None,
                published: bool = False) -> list[Path]:
    """Write one PNG per table (bars; few-shot: its curve); return their paths."""
    out = []
    for t, p in zip(tables, plot_paths(target, tables), strict=True):
        if t.curve is not None:
            out.append(draw_curve(t.curve, p, published))
        elif t.chart:
            out.append(draw_chart(t.chart, p, deltas_to, published))
    return out
