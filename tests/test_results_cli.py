"""The ``python -m spotlighter.results`` command line: exit codes, stdout table, --csv, --plot."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from spotlighter.results import cli
from spotlighter.results.constants import PLOT_HINT
from spotlighter.results.layout import seed_dir_path
from spotlighter.results.synthetic import eval_log, train_log, write_log

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture
def root(tmp_path):
    """CoOp and ZeroshotCLIP base-to-novel runs on oxford_pets and a synthetic 'minibench'."""
    out = tmp_path / "output"
    for seed in (1, 2, 3):
        for dataset, base, new in (("oxford_pets", 936 + seed, 952 - seed), ("minibench", 600, 500 + seed)):
            write_log(seed_dir_path(out, "base2new", "CoOp", "vit_b16_ep50", dataset, "base", 16, seed),
                      train_log(base, 1000, style="coop", trainer="CoOp", dataset=dataset))
            write_log(seed_dir_path(out, "base2new", "CoOp", "vit_b16_ep50", dataset, "new", 16, seed),
                      eval_log(new, 1000, style="coop", trainer="CoOp", dataset=dataset))
            write_log(seed_dir_path(out, "base2new", "ZeroshotCLIP", "vit_b16", dataset, "base", 16, seed),
                      eval_log(base - 50, 1000, trainer="ZeroshotCLIP", dataset=dataset))
            write_log(seed_dir_path(out, "base2new", "ZeroshotCLIP", "vit_b16", dataset, "new", 16, seed),
                      eval_log(new + 20, 1000, trainer="ZeroshotCLIP", dataset=dataset))
    return out


def test_module_cli_prints_table_and_writes_csv(root, tmp_path):
    csv_path = tmp_path / "tables" / "b2n.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "spotlighter.results", "base2new", "--root", str(root), "--trainers", "coop",
         "--datasets", "oxford_pets", "--shots", "16", "--seeds", "1,2,3", "--csv", str(csv_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("## Base-to-novel generalisation (16 shots)\n")
    assert f"root: `{root}` · shots: 16 · seeds: 1, 2, 3 ·" in proc.stdout
    assert ("| oxford_pets | CoOp | 93.80 ± 0.10 (3) | 95.00 ± 0.10 (3) | 94.40 ± 0.00 (3) | 93.67 | 95.29 | 94.47 "
            "| +0.13 | -0.29 | -0.07 |") in proc.stdout
    assert "ZeroshotCLIP" not in proc.stdout and "minibench" not in proc.stdout
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["trainer"], r["dataset"], r["base_mean"], r["new_n"]) for r in rows] == [
        ("CoOp", "oxford_pets", "93.8", "3"), ("CoOp", "average", "93.8", "")]


def test_trainers_side_by_side_and_no_published(root, capsys):
    assert cli.main(["base2new", "--root", str(root), "--no-published"]) == 0
    out = capsys.readouterr().out
    assert "| Dataset | Trainer | Base | New | HM |\n" in out
    assert "| oxford_pets | ZeroshotCLIP | 88.80 ± 0.10 (3) | 97.00 ± 0.10 (3) |" in out
    assert "| minibench | CoOp | 60.00 ± 0.00 (3) | 50.20 ± 0.10 (3) |" in out
    # ZeroshotCLIP is listed before CoOp for each dataset, and all 11 datasets are listed
    assert out.index("| oxford_pets | ZeroshotCLIP") < out.index("| oxford_pets | CoOp")
    assert "| Average (2 of 12 datasets) | CoOp |" in out and "Pub." not in out


def test_nothing_found_exits_1_naming_root_and_pattern(tmp_path, capsys):
    assert cli.main(["xd", "--root", str(tmp_path / "empty")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"no xd runs under {tmp_path / 'empty'}" in captured.err
    assert str(tmp_path / "empty" / "evaluation" / "<Trainer>" / "<cfg>_<K>shots" / "<target>" / "seed<S>") \
        in captured.err


def test_unknown_published_method_is_a_usage_error(root, capsys):
    assert cli.main(["base2new", "--root", str(root), "--published-methods", "NoSuch"]) == 2
    assert "unknown published method 'NoSuch'" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install -e .[plot])")
def test_plot_writes_valid_png(root, tmp_path, capsys):
    png = tmp_path / "plots" / "b2n.png"
    assert cli.main(["base2new", "--root", str(root), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    folder = tmp_path / "plot_dir"
    assert cli.main(["base2new", "--root", str(root), "--plot", str(folder)]) == 0
    assert (folder / "base2new_16shots.png").read_bytes()[:8] == PNG_SIGNATURE


def test_plot_without_matplotlib_exits_2_with_hint(root, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert cli.main(["base2new", "--root", str(root), "--plot", "out.png"]) == 2
    captured = capsys.readouterr()
    assert PLOT_HINT in captured.err
    assert PLOT_HINT == "--plot needs matplotlib: pip install matplotlib (or pip install -e .[plot])"
    assert captured.out == "" and not Path("out.png").exists()


def test_results_sh_wrapper(root):
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "results.sh"), "dg", "--root", str(root)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no dg runs under" in proc.stderr
