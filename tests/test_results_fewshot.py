"""CoOp's few-shot protocol in the results tool: the accuracy-vs-shots table of a synthetic output tree
(hand-computed means and stds), its CSV / LaTeX forms, published rows, and the curve PNG."""

import csv
import io
import struct

import pytest

from spotlighter.output_tree import fewshot_seed_dir
from spotlighter.results.cli import main
from spotlighter.results.published import load_fewshot_published, parse_fewshot_published
from spotlighter.results.record import make_record, write_record

# (trainer, config, shots, seed) -> correct out of TOTAL test images
TOTAL = 200
COOP = {(1, 1): 120, (1, 2): 124, (1, 3): 128,  # 60, 62, 64 %: mean 62, std 2
        (2, 1): 130, (2, 2): 134,  # 65, 67 %: mean 66, std sqrt(2)
        (16, 1): 160, (16, 2): 160, (16, 3): 166}  # 80, 80, 83 %: mean 81, std sqrt(3)
ZS_CORRECT = 110  # 55 %, one evaluation (seed 1, shots null)


def _write(root, trainer, config, dataset, shots, seed, correct, record_shots):
    d = fewshot_seed_dir(str(root), dataset, trainer, config, shots, seed)
    write_record(d, make_record(trainer=trainer, config=config, preset=None, dataset=dataset, subset="all",
                                shots=record_shots, seed=seed, split="test", correct=correct, total=TOTAL,
                                macro_f1=50.0, epoch=None, wall_time_s=1.0, output_dir=d))


@pytest.fixture
def tree(tmp_path):
    for (shots, seed), correct in COOP.items():
        _write(tmp_path, "CoOp", "cfgA", "dtd", shots, seed, correct, shots)
    _write(tmp_path, "ZeroshotCLIP", "vit_b16", "dtd", 0, 1, ZS_CORRECT, None)
    return tmp_path


def _rows(text):
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]


def test_table_means_stds_and_missing_seeds(tree, capsys):
    assert main(["fewshot", "--root", str(tree), "--seeds", "1,2,3", "--no-published"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert rows[0] == ["Shots", "ZeroshotCLIP (zero-shot)", "CoOp"]
    by_shot = {r[0]: r[1:] for r in rows[1:]}
    assert list(by_shot) == ["1", "2", "4", "8", "16"]
    # zero-shot: one value, the same in every row
    assert all(v[0] == "55.00 (1)" for v in by_shot.values())
    assert by_shot["1"][1] == "62.00 ± 2.00 (3)"
    assert by_shot["2"][1].startswith("66.00 ± 1.41 (2)")  # seed 3 missing: footnoted
    assert by_shot["16"][1] == "81.00 ± 1.73 (3)"
    assert by_shot["4"][1].startswith("—")
    assert "2 shots: seed(s) 3 missing" in out
    assert "fewshot/dtd/CoOp/cfgA_2shots" in out


def test_csv_and_latex(tree, capsys):
    assert main(["fewshot", "--root", str(tree), "--format", "csv", "--no-published"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    coop16 = next(r for r in rows if r["trainer"] == "CoOp" and r["shots"] == "16")
    assert float(coop16["acc_mean"]) == pytest.approx(81.0)
    assert float(coop16["acc_std"]) == pytest.approx(3 ** 0.5, abs=1e-4)
    assert coop16["acc_n"] == "3" and coop16["complete"] == "True"
    zs = [r for r in rows if r["trainer"] == "ZeroshotCLIP"]
    assert len(zs) == 5 and {r["acc_mean"] for r in zs} == {"55.0"} and zs[0]["zero_shot"] == "True"
    assert main(["fewshot", "--root", str(tree), "--format", "latex", "--no-published"]) == 0
    tex = capsys.readouterr().out
    assert r"\toprule" in tex and r"\label{tab:fewshot_dtd}" in tex
    assert "1-shot & 2-shot & 4-shot & 8-shot & 16-shot" in tex
    assert r"\textbf{81.00}" in tex  # CoOp beats zero-shot at 16 shots


def test_published_rows_beside_ours(tmp_path, capsys):
    _write(tmp_path, "CoOp", "cfgA", "imagenet", 16, 1, 150, 16)
    assert main(["fewshot", "--root", str(tmp_path)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows[0] == ["Shots", "CoOp", "CLIP (published, ViT-B/16)", "CoOp (published, ViT-B/16)"]
    by_shot = {r[0]: r[1:] for r in rows[1:]}
    assert by_shot["16"] == ["75.00 (1)", "66.73", "71.51"]
    assert by_shot["1"][1:] == ["66.73", "—"]  # the zero-shot number is flat; CoOp's only at 16


def test_shipped_published_file_names_backbones():
    pub = load_fewshot_published()
    assert {p.backbone for p in pub.rows.values()} == {"ViT-B/16"}
    assert pub.of("CoOp", "imagenet")[16].accuracy == 71.51
    with pytest.raises(ValueError, match=r"fewshot_published.csv: data row 1: shots must be an integer"):
        parse_fewshot_published("method,dataset,shots,accuracy,backbone,source\nCoOp,dtd,x,1,RN50,s\n")
    with pytest.raises(ValueError, match="missing column"):
        parse_fewshot_published("method,dataset,accuracy\n")


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_plot_curve_file_and_size(tree, capsys):
    pytest.importorskip("matplotlib")
    from spotlighter.results.plot import CURVE_SIZE_IN, DPI

    target = tree / "curve.png"
    assert main(["fewshot", "--root", str(tree), "--plot", str(target), "--plot-published"]) == 0
    assert "plot written to" in capsys.readouterr().out
    assert _png_size(target) == (round(CURVE_SIZE_IN[0] * DPI), round(CURVE_SIZE_IN[1] * DPI))
    assert target.stat().st_size > 5000  # lines, band, legend drawn


def test_plot_deltas_refused_for_fewshot(tree, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fewshot", "--root", str(tree), "--plot", str(tree / "x.png"), "--plot-deltas"])
    assert exc.value.code == 2
    assert "--plot-deltas applies to the bar charts" in capsys.readouterr().err
