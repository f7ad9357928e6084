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
    # one dataset: no Average row (it would repeat the row), in the table or the CSV
    assert [(r["trainer"], r["dataset"], r["base_mean"], r["new_n"]) for r in rows] == [
        ("CoOp", "oxford_pets", "93.8", "3")]
    assert "| Average" not in proc.stdout
    assert f"CSV written to {csv_path.resolve()}" in proc.stdout  # says where, without -v


def test_trainers_side_by_side_and_no_published(root, capsys):
    assert cli.main(["base2new", "--root", str(root), "--no-published"]) == 0
    out = capsys.readouterr().out
    assert "| Dataset | Trainer | Base | New | HM |\n" in out
    assert "| oxford_pets | ZeroshotCLIP | 88.80 ± 0.10 (3) | 97.00 ± 0.10 (3) |" in out
    assert "| minibench | CoOp | 60.00 ± 0.00 (3) | 50.20 ± 0.10 (3) |" in out
    # ZeroshotCLIP is listed before CoOp for each dataset, and all 11 datasets are listed
    assert out.index("| oxford_pets | ZeroshotCLIP") < out.index("| oxford_pets | CoOp")
    assert "| Average (2 of 12 datasets), HM of mean Base and mean New | CoOp |" in out and "Pub." not in out


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


def test_minibench_only_has_no_empty_published_columns(root, capsys):
    """A dataset without published numbers gets no Pub./Δ columns (not columns of dashes)."""
    assert cli.main(["base2new", "--root", str(root), "--datasets", "minibench"]) == 0
    out = capsys.readouterr().out
    assert "| Dataset | Trainer | Base | New | HM |\n" in out and "Pub." not in out and "Δ" not in out
    assert "| Average" not in out


def _xd_tree(root, source, eval_dir, targets, totals=2500):
    for trainer, offset in (("ZeroshotCLIP", 0.0), ("CoOp", 5.0)):
        for seed in (1, 2, 3):
            folders = [(root / source / trainer / "cfg_16shots" / f"seed{seed}", source)]
            folders += [(root / eval_dir / trainer / "cfg_16shots" / t / f"seed{seed}", t) for t in targets]
            for k, (folder, dataset) in enumerate(folders):
                correct = int(totals * (0.40 + 0.05 * k) + offset * totals / 100) + seed
                write_log(folder, eval_log(correct, totals, trainer=trainer, dataset=dataset))


def test_xd_and_dg_tables_for_a_minibench_source(tmp_path, capsys):
    root = tmp_path / "out"
    _xd_tree(root, "minibench", "evaluation_from_minibench",
             ["minibench_glyphs", "minibench_textures", "minibench_objects", "minibench_sketch"])
    assert cli.main(["xd", "--root", str(root), "--source", "minibench"]) == 0
    out = capsys.readouterr().out
    assert "## Cross-dataset transfer (16 shots, source minibench)" in out
    assert "| minibench (source) | 40.08 ± 0.04 (3) | 45.08 ± 0.04 (3) |" in out
    assert "| minibench_glyphs |" in out and "minibench_sketch" not in out  # a DG target is not an xd target
    assert "| Average over targets (3) |" in out
    # binomial standard error of one accuracy, from the test-set size the records carry
    assert "standard error of one accuracy ≤ 1.00 points" in out and "n = 2,500 test images" in out
    # the source is inferred from --datasets when they are its registered targets
    assert cli.main(["dg", "--root", str(root), "--datasets", "minibench_sketch"]) == 0
    out = capsys.readouterr().out
    assert "| minibench_sketch |" in out and "| Average" not in out  # one target: no average row


def test_plot_axis_zoomed_to_the_data_and_deltas_to_zero_shot():
    """1-2 point gaps stay visible: the value axis spans the bars and error bars (not 0-100), and
    --plot-deltas draws each method minus zero-shot, with 0 on the axis."""
    from spotlighter.results.plot import _delta_series, value_limits
    from spotlighter.results.stats import Stat

    series = {"ZeroshotCLIP": [Stat(53.0, 0.0, 3), Stat(45.0, 0.0, 3)],
              "CoOp": [Stat(55.0, 0.5, 3), Stat(44.0, 1.0, 3)]}
    lo, hi = value_limits(series, deltas=False)
    assert 40.0 < lo < 43.0 and 55.5 < hi < 58.0
    deltas = _delta_series(series, "ZeroshotCLIP")
    assert list(deltas) == ["CoOp"]
    assert [s.mean for s in deltas["CoOp"]] == [2.0, -1.0] and deltas["CoOp"][1].std == 1.0
    lo, hi = value_limits(deltas, deltas=True)
    assert lo < -2.0 and hi > 2.5 and lo < 0 < hi
    assert _delta_series(series, "MaPLe") is None  # no reference: plain accuracies


def test_nothing_found_says_what_to_type(root, tmp_path, capsys):
    """Runs in the demo's output folder (OUTPUT/demo) or from another xd source: the error says the command."""
    demo = tmp_path / "output" / "demo"
    for seed in (1, 2):
        write_log(seed_dir_path(demo, "base2new", "CoOp", "c", "minibench", "base", 16, seed),
                  train_log(600, 1000, style="coop", trainer="CoOp", dataset="minibench"))
        write_log(seed_dir_path(demo, "xd", "CoOp", "c", "minibench_glyphs", "target", 16, seed, source="minibench"),
                  eval_log(300, 1000, style="coop", trainer="CoOp", dataset="minibench_glyphs"))
    empty = tmp_path / "empty"  # an output root whose runs are all in its demo/ folder
    empty.mkdir()
    (empty / "demo").symlink_to(demo)
    assert cli.main(["base2new", "--root", str(empty)]) == cli.EXIT_NOTHING_FOUND
    err = capsys.readouterr().err
    assert f"hint: scripts/demo.sh writes to {empty / 'demo'}: python -m spotlighter.results base2new --root " \
           f"{empty / 'demo'}" in err
    assert cli.main(["xd", "--root", str(demo)]) == cli.EXIT_NOTHING_FOUND
    assert "hint: runs from source minibench are there: add --source minibench" in capsys.readouterr().err
    assert cli.main(["xd", "--root", str(empty)]) == cli.EXIT_NOTHING_FOUND
    assert f"--root {empty / 'demo'} --source minibench" in capsys.readouterr().err
