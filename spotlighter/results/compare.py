"""Paired comparison of two methods over the (dataset, seed) pairs both have, with a confidence interval.

For every (dataset, seed) that method A and method B both hold a result for, the difference A − B is taken
per metric (base-to-novel: Base, New and the HM of that pair's own Base and New; cross-dataset / DG: the
accuracy on each target). The mean difference gets a confidence interval (default 95 %): a paired Student t
interval over the pairs, or a percentile bootstrap over the pairs (seeded, deterministic). The comparison
says "A > B" or "B > A" only when the interval excludes 0, else "no decision".

Pure Python (standard library only): the Student t quantile is the exact inverse of its distribution
function, computed from the regularized incomplete beta function by bisection.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..output_tree import ROLE_BASE, ROLE_NEW, ROLE_TARGET
from .constants import (BASE2NEW_DATASETS, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, DECIMALS,
                        DEFAULT_INTERVAL, DG_TARGETS_BY_SOURCE, INTERVAL_BOOTSTRAP, INTERVAL_METHODS,
                        INTERVAL_T, MISSING_MARK, PROTOCOL_TITLES, XD_SOURCE, XD_TARGETS_BY_SOURCE)
from .layout import check_protocol, discover, search_patterns
from .parse import Result, canonical_trainer, collect
from .stats import harmonic_mean
from .tables import Method, base2new_canonical, methods_of, ordered_datasets

A_WINS = "A > B"
B_WINS = "B > A"
NO_DECISION = "no decision"
B2N_METRICS = ("Base", "New", "HM")
TRANSFER_METRICS = ("Accuracy",)
# Numerical settings of the incomplete beta function and the quantile search.
_BETA_MAX_TERMS = 300
_BETA_EPS = 1e-15
_TINY = 1e-300
_QUANTILE_ITERATIONS = 200


class CompareError(ValueError):
    """A comparison that cannot be made; the message is one line for the user."""


class NothingFound(CompareError):
    """No runs of the protocol at all under the root."""


# ----------------------------------------------------------------------------- Student t distribution
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), valid for x < (a+1)/(a+b+2)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    value = d
    for m in range(1, _BETA_MAX_TERMS + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            step = c * d
            value *= step
        if abs(step - 1.0) < _BETA_EPS:
            break
    return value


def regularized_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for 0 ≤ x ≤ 1, a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (e.g. t_quantile(0.975, 2) = 4.303)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level must lie strictly between 0 and 1, got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(_QUANTILE_ITERATIONS):
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


# ----------------------------------------------------------------------------- intervals
@dataclass(frozen=True)
class Interval:
    """Mean of the paired differences A − B of one metric and its confidence interval (None below 2 pairs)."""

    metric: str
    n: int
    mean: float | None
    sd: float | None
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2.0

    @property
    def decision(self) -> str:
        """``A > B`` when the interval lies above 0, ``B > A`` when below, else ``no decision``."""
        if self.low is not None and self.low > 0:
            return A_WINS
        if self.high is not None and self.high < 0:
            return B_WINS
        return NO_DECISION


def t_interval(metric: str, diffs: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Paired t interval: mean ± t((1 + confidence) / 2, n − 1) · sd / √n."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else None
    if n < 2:
        return Interval(metric, n, mean, None, None, None)
    sd = statistics.stdev(diffs)
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(metric, n, mean, sd, mean - half, mean + half)


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (the default of numpy.percentile)."""
    position = q * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (position - lower) * (ordered[upper] - ordered[lower])


def bootstrap_intervals(metrics: Sequence[str], columns: Sequence[Sequence[float]], confidence: float = CONFIDENCE,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> list[Interval]:
    """Percentile bootstrap over the pairs: the pairs are drawn with replacement (the same draw for every
    metric), ``resamples`` times, from ``random.Random(seed)``; the interval holds the central
    ``confidence`` share of the resampled means."""
    if resamples < 1:
        raise ValueError(f"bootstrap resamples must be at least 1, got {resamples}")
    n = len(columns[0]) if columns else 0
    if n < 2:
        return [Interval(m, n, statistics.fmean(c) if c else None, None, None, None) for m, c in zip(metrics, columns)]
    rng = random.Random(seed)
    means: list[list[float]] = [[] for _ in columns]
    for _ in range(resamples):
        draw = [rng.randrange(n) for _ in range(n)]
        for k, column in enumerate(columns):
            means[k].append(math.fsum(column[i] for i in draw) / n)
    alpha = 1.0 - confidence
    out = []
    for metric, column, resampled in zip(metrics, columns, means):
        resampled.sort()
        out.append(Interval(metric, n, statistics.fmean(column), statistics.stdev(column),
                            _percentile(resampled, alpha / 2.0), _percentile(resampled, 1.0 - alpha / 2.0)))
    return out


# ----------------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class Pair:
    """One (dataset, seed) both methods have: their metric values (Base, New, HM or Accuracy)."""

    dataset: str
    seed: int
    a: tuple[float, ...]
    b: tuple[float, ...]

    @property
    def diff(self) -> tuple[float, ...]:
        return tuple(x - y for x, y in zip(self.a, self.b))


@dataclass(frozen=True)
class Missing:
    """A (dataset, seed) left out of the pairs: what ``side`` ('A' or 'B') lacks there."""

    dataset: str
    seed: int
    side: str
    what: str


@dataclass
class Comparison:
    """Method A against method B over their common (dataset, seed) pairs."""

    protocol: str
    shots: int
    root: str
    a: Method
    b: Method
    metrics: tuple[str, ...]
    pairs: list[Pair]
    intervals: list[Interval]
    missing: list[Missing] = field(default_factory=list)
    interval_method: str = DEFAULT_INTERVAL
    confidence: float = CONFIDENCE
    resamples: int = BOOTSTRAP_RESAMPLES
    seed: int = BOOTSTRAP_SEED
    source: str = XD_SOURCE

    def interval(self, metric: str) -> Interval:
        for interval in self.intervals:
            if interval.metric == metric:
                return interval
        raise KeyError(f"no metric {metric!r}; have {', '.join(self.metrics)}")

    @property
    def main(self) -> Interval:
        """The interval that ranks: HM (base-to-novel) or the target accuracy (xd, dg)."""
        return self.intervals[-1]


def method_name(m: Method) -> str:
    return f"{m.trainer}/{m.config}"


def parse_spec(text: str) -> tuple[str, str | None]:
    """``trainer[:config]`` -> (trainer, config or None)."""
    trainer, _, config = text.strip().partition(":")
    if not trainer.strip():
        raise CompareError(f"empty trainer in {text!r}; expected TRAINER or TRAINER:CONFIG, e.g. coop:vit_b16_ep50")
    return trainer.strip(), config.strip() or None


def _found_text(methods: Sequence[Method]) -> str:
    by_trainer: dict[str, list[str]] = defaultdict(list)
    for m in methods:
        by_trainer[m.trainer].append(m.config)
    return "; ".join(f"{t} ({', '.join(c)})" for t, c in by_trainer.items())


def resolve(spec: str, found: Sequence[Method], side: str, protocol: str, root: str | Path,
            source: str = XD_SOURCE) -> Method:
    """The one method of ``found`` that ``spec`` (``trainer[:config]``, trainer case-insensitive, CLI
    aliases allowed) names; CompareError naming what was found otherwise."""
    trainer, config = parse_spec(spec)
    names = {trainer.lower(), canonical_trainer(trainer).lower()}
    of_trainer = [m for m in found if m.trainer.lower() in names]
    if not of_trainer and not found:
        searched = " and ".join(search_patterns(root, protocol, source))
        raise NothingFound(f"no {protocol} runs under {root} (searched {searched})")
    if not of_trainer:
        raise CompareError(f"{side} {spec!r}: no {protocol} runs of trainer {canonical_trainer(trainer)!r} under "
                           f"{root}; found: {_found_text(found)}")
    if config is None:
        configs = sorted({m.config for m in of_trainer})
        if len(configs) > 1:
            raise CompareError(f"{side} {spec!r}: {of_trainer[0].trainer} has several configs under {root} "
                               f"({', '.join(configs)}); name one, e.g. {of_trainer[0].trainer}:{configs[0]}")
        return of_trainer[0]
    chosen = [m for m in of_trainer if m.config == config]
    if not chosen:
        raise CompareError(f"{side} {spec!r}: no {protocol} runs of {of_trainer[0].trainer} with config {config!r} "
                           f"under {root}; its configs: {', '.join(sorted({m.config for m in of_trainer}))}")
    return chosen[0]


def _shots_of(results: Sequence[Result], a: Method, b: Method, shots: int | None) -> int:
    def of(m: Method) -> set[int]:
        return {r.shots for r in results if Method(r.trainer, r.config) == m}

    if shots is not None:
        return shots
    common = sorted(of(a) & of(b))
    if not common:
        raise CompareError(f"A {method_name(a)} has shots {sorted(of(a))}, B {method_name(b)} has shots "
                           f"{sorted(of(b))}: no shot count in common")
    if len(common) > 1:
        raise CompareError(f"A and B both have runs with {', '.join(map(str, common))} shots; pick one with "
                           f"--shots (shots= in compare())")
    return common[0]


def _values_of(results: Sequence[Result], m: Method, protocol: str, shots: int
               ) -> tuple[dict[tuple[str, int], tuple[float, ...]], dict[tuple[str, int], str]]:
    """Per (dataset, seed): the metric values of ``m``, or what is missing there."""
    roles = (ROLE_BASE, ROLE_NEW) if protocol == "base2new" else (ROLE_TARGET,)
    runs: dict[tuple[str, int], dict[str, Result]] = defaultdict(dict)
    for r in results:
        if Method(r.trainer, r.config) == m and r.shots == shots and r.role in roles:
            runs[(r.dataset, r.seed)][r.role] = r
    values, missing = {}, {}
    for key, by_role in runs.items():
        problems = []
        for role in roles:
            r = by_role.get(role)
            label = "" if protocol != "base2new" else f"{role}: "
            if r is None:
                problems.append(f"{label}no run folder")
            elif not r.ok:
                problems.append(f"{label}no result ({r.reason})")
        if problems:
            missing[key] = "; ".join(problems)
            continue
        accs = tuple(by_role[role].accuracy for role in roles)
        values[key] = accs + (harmonic_mean(*accs),) if protocol == "base2new" else accs  # type: ignore[arg-type]
    return values, missing


def _dataset_order(keys: Sequence[tuple[str, int]], protocol: str, source: str) -> list[tuple[str, int]]:
    canonical = base2new_canonical(d for d, _ in keys) if protocol == "base2new" else (
        DG_TARGETS_BY_SOURCE if protocol == "dg" else XD_TARGETS_BY_SOURCE).get(source, ())
    order = {d: i for i, d in enumerate(ordered_datasets((d for d, _ in keys), canonical))}
    return sorted(keys, key=lambda k: (order[k[0]], k[1]))


def _seeds_text(keys: Sequence[tuple[str, int]]) -> str:
    by_dataset: dict[str, list[int]] = defaultdict(list)
    for dataset, seed in keys:
        by_dataset[dataset].append(seed)
    return "; ".join(f"{d} seeds {', '.join(map(str, sorted(s)))}" for d, s in by_dataset.items()) or "nothing"


def compare_methods(
    results: Sequence[Result],
    protocol: str,
    a: Method,
    b: Method,
    *,
    root: str | Path = "",
    shots: int | None = None,
    interval: str = DEFAULT_INTERVAL,
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    source: str = XD_SOURCE,
) -> Comparison:
    """A vs B over the (dataset, seed) pairs of ``results`` both have (see the module docstring)."""
    check_protocol(protocol)
    if interval not in INTERVAL_METHODS:
        raise CompareError(f"unknown interval method {interval!r}; expected one of {', '.join(INTERVAL_METHODS)}")
    if not 0.0 < confidence < 1.0:
        raise CompareError(f"confidence must lie strictly between 0 and 1 (e.g. 0.95), got {confidence}")
    if a == b:
        raise CompareError(f"A and B are the same method ({method_name(a)}); compare two different ones")
    shots = _shots_of(results, a, b, shots)
    values_a, missing_a = _values_of(results, a, protocol, shots)
    values_b, missing_b = _values_of(results, b, protocol, shots)
    common = _dataset_order(list(set(values_a) & set(values_b)), protocol, source)
    if not common:
        raise CompareError(f"no (dataset, seed) pair has results of both A {method_name(a)} and B {method_name(b)} "
                           f"({shots} shots); A has: {_seeds_text(_dataset_order(list(values_a), protocol, source))}"
                           f"; B has: {_seeds_text(_dataset_order(list(values_b), protocol, source))}")
    pairs = [Pair(d, s, values_a[(d, s)], values_b[(d, s)]) for d, s in common]
    missing = []
    for key in _dataset_order(list((set(values_a) | set(missing_a) | set(values_b) | set(missing_b)) - set(common)),
                              protocol, source):
        for side, values, problems in (("A", values_a, missing_a), ("B", values_b, missing_b)):
            if key not in values:
                missing.append(Missing(key[0], key[1], side, problems.get(key, "no run folder")))
    metrics = B2N_METRICS if protocol == "base2new" else TRANSFER_METRICS
    columns = [[p.diff[k] for p in pairs] for k in range(len(metrics))]
    if interval == INTERVAL_T:
        intervals = [t_interval(m, c, confidence) for m, c in zip(metrics, columns)]
    else:
        intervals = bootstrap_intervals(metrics, columns, confidence, resamples, seed)
    return Comparison(protocol, shots, str(root), a, b, metrics, pairs, intervals, missing, interval, confidence,
                      resamples, seed, source)


def _collect_for(root: str | Path, protocol: str, methods: Sequence[Method], datasets: Sequence[str] | None,
                 shots: Sequence[int] | None, seeds: Sequence[int] | None, source: str) -> list[Result]:
    results = collect(root, protocol, trainers=sorted({m.trainer for m in methods}),
                      configs=sorted({m.config for m in methods}), datasets=datasets, shots=shots, seeds=seeds,
                      source=source)
    return [r for r in results if Method(r.trainer, r.config) in set(methods)]


def compare(
    root: str | Path,
    protocol: str,
    a: str,
    b: str,
    *,
    datasets: Sequence[str] | None = None,
    shots: int | None = None,
    seeds: Sequence[int] | None = None,
    source: str = XD_SOURCE,
    interval: str = DEFAULT_INTERVAL,
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Comparison:
    """Method ``a`` vs method ``b`` (each ``trainer[:config]``) over the runs of ``protocol`` under ``root``.

    Raises CompareError (one line) for a trainer or config not found, an ambiguous config, or no common pair.
    """
    return compare_all(root, protocol, b, [a], datasets=datasets, shots=shots, seeds=seeds, source=source,
                       interval=interval, confidence=confidence, resamples=resamples, seed=seed)[0]


def compare_all(
    root: str | Path,
    protocol: str,
    baseline: str,
    others: Sequence[str] | None = None,
    *,
    datasets: Sequence[str] | None = None,
    shots: int | None = None,
    seeds: Sequence[int] | None = None,
    source: str = XD_SOURCE,
    interval: str = DEFAULT_INTERVAL,
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> list[Comparison]:
    """Each of ``others`` (default: every other method found) as A against ``baseline`` as B."""
    check_protocol(protocol)
    found = methods_of(Method(s.trainer, s.config) for s in discover(root, protocol, source))
    b = resolve(baseline, found, "B", protocol, root, source)
    if others is None:
        chosen = [m for m in found if m != b]
        if not chosen:
            raise CompareError(f"only B {method_name(b)} has {protocol} runs under {root}; nothing to compare with")
    else:
        chosen = [resolve(spec, found, "A", protocol, root, source) for spec in others]
    results = _collect_for(root, protocol, chosen + [b], datasets, [shots] if shots is not None else None, seeds,
                           source)
    return [compare_methods(results, protocol, a, b, root=root, shots=shots, interval=interval,
                            confidence=confidence, resamples=resamples, seed=seed, source=source)
            for a in chosen]


# ----------------------------------------------------------------------------- rendering
def _num(value: float | None, *, signed: bool = True) -> str:
    if value is None:
        return MISSING_MARK
    return f"{value:+.{DECIMALS}f}" if signed else f"{value:.{DECIMALS}f}"


def _percent(confidence: float) -> str:
    return f"{100.0 * confidence:g} %"


def method_text(c: Comparison) -> str:
    """How the interval was computed, for the reader."""
    level = _percent(c.confidence)
    if c.interval_method == INTERVAL_BOOTSTRAP:
        return (f"{level} percentile bootstrap over the pairs ({c.resamples:,} resamples, seed {c.seed}); "
                "half-width = (high − low) / 2")
    n = len(c.pairs)
    quantile = (f" = {t_quantile((1.0 + c.confidence) / 2.0, n - 1):.3f}" if n > 1 else "")
    return (f"{level} paired t interval over the pairs: mean ± t({(1.0 + c.confidence) / 2.0:g}, n − 1){quantile}"
            " · sd / √n")


def _short(m: Method, other: Method) -> str:
    """The trainer's name, with the config when both sides are the same trainer."""
    return method_name(m) if m.trainer == other.trainer else m.trainer


def decision_text(c: Comparison, interval: Interval, *, names: bool = False) -> str:
    decision = interval.decision
    if interval.low is None:
        return f"{NO_DECISION} (needs ≥ 2 pairs)"
    if not names or decision == NO_DECISION:
        return decision
    winner, loser = (c.a, c.b) if decision == A_WINS else (c.b, c.a)
    return f"{_short(winner, loser)} > {_short(loser, winner)}"


def to_markdown(c: Comparison) -> str:
    """The comparison as Markdown: heading, how it was computed, one row per metric, the pairs left out."""
    title = PROTOCOL_TITLES[c.protocol]
    where = "" if c.protocol == "base2new" or c.source == XD_SOURCE else f", source {c.source}"
    datasets = list(dict.fromkeys(p.dataset for p in c.pairs))
    unit, kind = ("(dataset, seed)", "dataset") if c.protocol == "base2new" else ("(target, seed)", "target")
    per_pair = "; HM per pair from its own Base and New" if c.protocol == "base2new" else ""
    plural = "s" if len(datasets) > 1 else ""
    seeds = _seeds_text([(p.dataset, p.seed) for p in c.pairs])
    lines = [
        f"## {_short(c.a, c.b)} vs {_short(c.b, c.a)}: paired comparison, {title} ({c.shots} shots{where})",
        "",
        f"A = {method_name(c.a)} · B = {method_name(c.b)} · root: `{c.root}`",
        "",
        f"{len(c.pairs)} {unit} pairs on {len(datasets)} {kind}{plural} ({seeds})"
        f" · difference A − B in accuracy points{per_pair} · {method_text(c)}",
        "",
        f"| Metric | Pairs | Mean A − B | Std of differences | {_percent(c.confidence)} interval | Half-width "
        "| Decision |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for i in c.intervals:
        span = MISSING_MARK if i.low is None else f"[{_num(i.low)}, {_num(i.high)}]"
        lines.append(f"| {i.metric} | {i.n} | {_num(i.mean)} | {_num(i.sd, signed=False)} | {span} "
                     f"| {_num(i.half_width, signed=False)} | {decision_text(c, i)} |")
    lines += ["", f'"A > B" / "B > A" only when the interval excludes 0, else "{NO_DECISION}".']
    if c.missing:
        left_out = len({(m.dataset, m.seed) for m in c.missing})
        lines += ["", f"Left out: {left_out} {unit} pair{'s' if left_out > 1 else ''} missing on one side:"]
        lines += [f"- {m.dataset} seed {m.seed}: {m.side} ({method_name(c.a if m.side == 'A' else c.b)}) "
                  f"{m.what}" for m in c.missing]
    return "\n".join(lines) + "\n"


def summary_markdown(comparisons: Sequence[Comparison]) -> str:
    """One row per comparison with the interval that ranks (HM, or the target accuracy)."""
    if not comparisons:
        return ""
    first = comparisons[0]
    metric = first.main.metric
    lines = [f"## Summary: {metric} difference A − B ({method_text(first)})", "",
             f"| A | B | Pairs | Mean A − B | {_percent(first.confidence)} interval | Half-width | Decision |",
             "|---|---|---:|---:|---:|---:|---|"]
    for c in comparisons:
        i = c.main
        span = MISSING_MARK if i.low is None else f"[{_num(i.low)}, {_num(i.high)}]"
        lines.append(f"| {method_name(c.a)} | {method_name(c.b)} | {i.n} | {_num(i.mean)} | {span} "
                     f"| {_num(i.half_width, signed=False)} | {decision_text(c, i, names=True)} |")
    return "\n".join(lines) + "\n"


def render(comparisons: Sequence[Comparison]) -> str:
    """Every comparison, then a summary row per comparison when there are several."""
    text = "\n".join(to_markdown(c) for c in comparisons)
    if len(comparisons) > 1:
        text += "\n" + summary_markdown(comparisons)
    return text
