"""Paper-ready LaTeX tables (booktabs): our rows and published rows, best of ours per column in bold.

The layout is the papers': base-to-novel as one block of methods per dataset (Base, New, HM columns),
cross-dataset and DG as one row per method (source, targets, average). Published rows carry a dagger
and a footnote naming their source. Cells are seed means (``std=True``: mean ± sample std); a cell with a
caveat (missing seeds, an incomplete average) gets a superscript number, explained in a ``%`` comment
above the table so the compiled table stays clean. Bold: the best of our rows per column (per dataset
block), among cells without a caveat, when at least two compete; published rows are never bold.
"""

from __future__ import annotations

from typing import Sequence

from .constants import DECIMALS, LATEX_MISSING_MARK, PUBLISHED_MARK
from .stats import Stat
from .tables import CellValue, PaperRow, PaperTable, Table

_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return "".join(_SPECIAL.get(ch, ch) for ch in text)


def _mean(value: CellValue) -> float | None:
    if isinstance(value, Stat):
        return value.mean
    return value if isinstance(value, float) else None


def _notes(row: PaperRow, col: int) -> tuple[int, ...]:
    return row.notes[col] if col < len(row.notes) else ()


def _best_columns(rows: Sequence[PaperRow], width: int) -> list[set[int]]:
    """Per column, the indices of our rows holding its best rounded mean among those without a caveat
    (none when fewer than two such rows have a value there)."""
    best: list[set[int]] = []
    for col in range(width):
        means = {i: round(m, DECIMALS) for i, r in enumerate(rows)
                 if not r.published and not _notes(r, col) and (m := _mean(r.values[col])) is not None}
        top = max(means.values()) if len(means) > 1 else None
        best.append({i for i, m in means.items() if m == top} if top is not None else set())
    return best


def _number(value: CellValue, *, std: bool, bold: bool) -> str:
    mean = _mean(value)
    if mean is None:
        return LATEX_MISSING_MARK
    text = f"{mean:.{DECIMALS}f}"
    text = rf"\textbf{{{text}}}" if bold else text
    if std and isinstance(value, Stat) and value.std is not None:
        text += rf" $\pm$ {value.std:.{DECIMALS}f}"
    return text


def _cell(row: PaperRow, col: int, *, std: bool, bold: bool) -> str:
    text = _number(row.values[col], std=std, bold=bold)
    notes = _notes(row, col)
    return text + (f"$^{{{','.join(map(str, sorted(set(notes))))}}}$" if notes else "")


def _label(row: PaperRow) -> str:
    return latex_escape(row.label) + (PUBLISHED_MARK if row.published else "")


def _comment(text: str) -> list[str]:
    return ["% " + line if line else "%" for line in text.replace("`", "").splitlines()]


def tabular_lines(paper: PaperTable, *, std: bool = False) -> list[str]:
    """``\\begin{tabular}`` ... ``\\end{tabular}`` with booktabs rules."""
    grouped = paper.group_header is not None
    spec = ("l" if grouped else "") + "l" + "r" * (len(paper.headers) - 1)
    header = [latex_escape(h) for h in ([paper.group_header] if paper.group_header else []) + paper.headers]
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    width = len(paper.headers) - 1
    for b, (title, rows) in enumerate(paper.blocks):
        best = _best_columns(rows, width)
        for i, row in enumerate(rows):
            cells = ([latex_escape(title) if i == 0 else ""] if grouped else []) + [_label(row)]
            cells += [_cell(row, c, std=std, bold=i in best[c]) for c in range(width)]
            lines.append(" & ".join(cells) + r" \\")
        if b < len(paper.blocks) - 1:
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return lines


def _label_key(table: Table) -> str:
    """``<protocol>_<K>shots``; few-shot: ``fewshot_<dataset>`` (one table per dataset)."""
    dataset = getattr(table.curve, "dataset", None)
    return f"{table.protocol}_{dataset}" if dataset else f"{table.protocol}_{table.shots}shots"


def to_latex(table: Table, *, std: bool = False) -> str:
    """The table as a LaTeX ``table`` float (needs ``\\usepackage{booktabs}``), preceded by ``%`` comments
    holding the meta line and the footnotes of the Markdown table."""
    if table.paper is None:
        raise ValueError(f"table {table.title!r} has no paper layout")
    paper = table.paper
    cells = "mean $\\pm$ sample std over seeds" if std else "mean over seeds"
    lines = [f"% {table.title} (python -m spotlighter.results --format latex; needs \\usepackage{{booktabs}})"]
    lines += _comment(table.meta)
    lines += _comment(f"Bold: the best of our rows per column{' per dataset' if paper.group_header else ''} "
                      "among cells without a caveat; published rows are never bold.")
    lines += _comment("\n".join(f"[{i}] {text}" for i, text in enumerate(table.footnotes, 1)))
    lines += [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(table.title)}: {cells}.}}",
        rf"\label{{tab:{_label_key(table)}}}",
        *tabular_lines(paper, std=std),
    ]
    if paper.published_note:
        lines.append(rf"\par\smallskip{{\footnotesize {PUBLISHED_MARK} Published: "
                     rf"{latex_escape(paper.published_note)}.\par}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
