"""Paper-ready tables: --format {markdown,csv,latex}, booktabs LaTeX with bold bests and marked published rows."""

import csv
import io
import re

import pytest

from spotlighter.results import base2new_table, cli, collect, load_published, transfer_table
from spotlighter.results.latex import latex_escape, to_latex
from spotlighter.results.layout import seed_dir_path
from spotlighter.results.published import load_transfer_published
from spotlighter.results.synthetic import eval_log, train_log, write_log

# base, new (correct of 1000) per seed; None: no folder
B2N = {"CoOp": {"oxford_pets": ((936, 938, 940), (952, 950, 948)), "dtd": ((800, 806, 812), (520, 530, None))},
       "MaPLe": {"oxford_pets": ((950, 953, 959), (970, 968, 966)), "dtd": ((800, 806, 812), (590, 592, 594))}}
XD = {"CoOp": {"imagenet": (715, 712, 718), "caltech101": (937, 935, 939), "dtd": (420, 425, 430)},
      "MaPLe": {"imagenet": (706, 707, 709), "caltech101": (935, 936, 933), "dtd": (466, 461, None)}}


@pytest.fixture
def b2n_root(tmp_path):
    for trainer, datasets in B2N.items():
        for dataset, (base, new) in datasets.items():
            for seed in (1, 2, 3):
                write_log(seed_dir_path(tmp_path, "base2new", trainer, "cfg", dataset, "base", 16, seed),
                          train_log(base[seed - 1], 1000, style="coop", trainer=trainer))
                if new[seed - 1] is not None:
                    write_log(seed_dir_path(tmp_path, "base2new", trainer, "cfg", dataset, "new", 16, seed),
                              eval_log(new[seed - 1], 1000, trainer=trainer))
    return tmp_path


@pytest.fixture
def xd_root(tmp_path):
    for trainer, datasets in XD.items():
        for dataset, values in datasets.items():
            role = "source" if dataset == "imagenet" else "target"
            for seed, correct in enumerate(values, 1):
                if correct is not None:
                    write_log(seed_dir_path(tmp_path, "xd", trainer, "cfg", dataset, role, 16, seed),
                              eval_log(correct, 1000, trainer=trainer))
    return tmp_path


def float_part(latex: str) -> str:
    """From ``\\begin{table}`` to the end (the comments above it name tmp paths)."""
    return latex[latex.index("\\begin{table}"):]


def assert_booktabs(latex: str) -> None:
    """One tabular, \\toprule / header / \\midrule / rows / \\bottomrule, as many cells in every row as the
    column spec says, no \\hline, balanced braces, every row ended by \\\\."""
    body = [line for line in latex.splitlines() if not line.startswith("%")]
    begin = [i for i, line in enumerate(body) if line.startswith("\\begin{tabular}")]
    end = [i for i, line in enumerate(body) if line == "\\end{tabular}"]
    assert len(begin) == 1 and len(end) == 1 and begin[0] < end[0]
    spec = re.fullmatch(r"\\begin\{tabular\}\{([lcr]+)\}", body[begin[0]]).group(1)
    rows = body[begin[0] + 1:end[0]]
    assert rows[0] == "\\toprule" and rows[2] == "\\midrule" and rows[-1] == "\\bottomrule"
    assert rows.count("\\toprule") == 1 and rows.count("\\bottomrule") == 1
    for line in rows:
        if line in ("\\toprule", "\\midrule", "\\bottomrule"):
            continue
        assert line.endswith(" \\\\") and line.count(" & ") == len(spec) - 1, line
    assert "\\hline" not in latex
    assert latex.count("{") - latex.count("\\{") == latex.count("}") - latex.count("\\}")
    assert latex.count("\\begin{table}") == latex.count("\\end{table}") == 1


def test_base2new_latex_exact(b2n_root):
    table = base2new_table(collect(b2n_root, "base2new"), root=b2n_root, datasets=["oxford_pets", "dtd"],
                           published=load_published())
    latex = to_latex(table)
    assert latex.startswith("% Base-to-novel generalisation (16 shots) (python -m spotlighter.results --format "
                            "latex; needs \\usepackage{booktabs})\n")
    assert "% [1] CoOp/cfg dtd new: seed 3 missing (no folder in " in latex
    assert float_part(latex) == r"""\begin{table}[t]
\centering
\caption{Base-to-novel generalisation (16 shots): mean over seeds.}
\label{tab:base2new_16shots}
\begin{tabular}{llrrr}
\toprule
Dataset & Method & Base & New & HM \\
\midrule
oxford\_pets & CoOp & 93.80 & 95.00 & 94.40 \\
 & MaPLe & \textbf{95.40} & \textbf{96.80} & \textbf{96.09} \\
 & CoOp$^{\dagger}$ & 93.67 & 95.29 & 94.47 \\
 & MaPLe$^{\dagger}$ & 95.43 & 97.76 & 96.58 \\
\midrule
dtd & CoOp & \textbf{80.60} & 52.50$^{1}$ & 63.58$^{1}$ \\
 & MaPLe & \textbf{80.60} & 59.20 & 68.26 \\
 & CoOp$^{\dagger}$ & 79.44 & 41.18 & 54.24 \\
 & MaPLe$^{\dagger}$ & 80.36 & 59.18 & 68.16 \\
\midrule
Average & CoOp & 93.80$^{2}$ & 95.00$^{2}$ & 94.40$^{2}$ \\
 & MaPLe & 88.00 & 78.00 & 82.70 \\
 & CoOp$^{\dagger}$ & 86.56 & 68.23 & 76.31 \\
 & MaPLe$^{\dagger}$ & 87.90 & 78.47 & 82.92 \\
\bottomrule
\end{tabular}
\par\smallskip{\footnotesize $^{\dagger}$ Published: Table I of Spotlighter (EMNLP 2025 Findings).\par}
\end{table}
"""
    assert_booktabs(latex)


def test_xd_latex_exact_with_std(xd_root):
    table = transfer_table(collect(xd_root, "xd"), "xd", root=xd_root, datasets=["caltech101", "dtd"],
                           published=load_transfer_published("xd"))
    latex = to_latex(table, std=True)
    assert float_part(latex) == r"""\begin{table}[t]
\centering
\caption{Cross-dataset transfer (16 shots): mean $\pm$ sample std over seeds.}
\label{tab:xd_16shots}
\begin{tabular}{lrrrr}
\toprule
Method & imagenet (source) & caltech101 & dtd & Average \\
\midrule
CoOp & \textbf{71.50} $\pm$ 0.30 & \textbf{93.70} $\pm$ 0.20 & 42.50 $\pm$ 0.50 & 68.10 \\
MaPLe & 70.73 $\pm$ 0.15 & 93.47 $\pm$ 0.15 & 46.35 $\pm$ 0.35$^{1}$ & 93.47$^{2}$ \\
CoOp$^{\dagger}$ & 71.51 & 93.70 & 41.92 & 67.81 \\
MaPLe$^{\dagger}$ & 70.72 & 93.53 & 46.49 & 70.01 \\
\bottomrule
\end{tabular}
\par\smallskip{\footnotesize $^{\dagger}$ Published: CoOp: CoCoOp (CVPR 2022) Table 2; MaPLe: MaPLe (CVPR 2023) Table 2.\par}
\end{table}
"""
    assert_booktabs(latex)


def test_dg_latex_without_published_and_single_method_has_no_bold(tmp_path):
    for seed in (1, 2):
        write_log(seed_dir_path(tmp_path, "dg", "CoOp", "cfg", "imagenet", "source", 16, seed), eval_log(710, 1000))
        write_log(seed_dir_path(tmp_path, "dg", "CoOp", "cfg", "imagenet_r", "target", 16, seed),
                  eval_log(750 + seed, 1000))
    latex = to_latex(transfer_table(collect(tmp_path, "dg"), "dg", root=tmp_path))
    assert_booktabs(latex)
    # the targets without runs are left out; the average over 1 of the 4 targets carries its caveat
    assert "Method & imagenet (source) & imagenet\\_r & Average \\\\\n\\midrule\n" in latex
    assert "\nCoOp & 71.00 & 75.15 & 75.15$^{2}$ \\\\\n\\bottomrule" in latex
    assert "textbf" not in latex and "dagger" not in latex


def test_latex_escape():
    assert latex_escape(r"a_b & 50% #1 {x} $ ~ ^ \ ") == (
        r"a\_b \& 50\% \#1 \{x\} \$ \textasciitilde{} \textasciicircum{} \textbackslash{} ")


def test_cli_formats(b2n_root, capsys):
    args = ["base2new", "--root", str(b2n_root), "--datasets", "oxford_pets,dtd"]
    assert cli.main(args) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith("## Base-to-novel generalisation (16 shots)\n")  # the default is unchanged
    assert cli.main(args + ["--format", "latex", "--std"]) == 0
    latex = capsys.readouterr().out
    assert_booktabs(latex)
    assert "oxford\\_pets & CoOp & 93.80 $\\pm$ 0.20 & 95.00 $\\pm$ 0.20 & 94.40 $\\pm$ 0.00 \\\\" in latex
    assert cli.main(args + ["--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["trainer"], r["dataset"]) for r in rows][:2] == [("CoOp", "oxford_pets"), ("MaPLe", "oxford_pets")]
    # with a non-Markdown stdout, where the --csv file went is said on stderr: stdout stays parseable
    csv_path = b2n_root / "t.csv"
    assert cli.main(args + ["--format", "latex", "--csv", str(csv_path)]) == 0
    captured = capsys.readouterr()
    assert "CSV written" not in captured.out and f"CSV written to {csv_path}" in captured.err
    with pytest.raises(SystemExit) as exc:
        cli.main(args + ["--std"])
    assert exc.value.code == 2
    assert "--std applies to --format latex" in capsys.readouterr().err
