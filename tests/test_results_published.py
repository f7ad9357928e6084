"""Published cross-dataset and DG numbers: the shipped files, and the deltas the xd/dg tables print."""

import csv
import importlib.util
import io
import statistics

import pytest

from spotlighter import registry
from spotlighter.results import base2new_table, cli, collect, load_published, to_csv, to_markdown, transfer_table
from spotlighter.results.layout import seed_dir_path
from spotlighter.results.published import load_transfer_published
from spotlighter.results.synthetic import eval_log, write_log

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("protocol, methods", [
    ("xd", ["CoOp", "CoCoOp", "MaPLe", "PromptSRC"]),
    ("dg", ["CLIP", "CoOp", "CoCoOp", "MaPLe", "PromptSRC"]),
])
def test_shipped_tables_cover_the_registry_datasets_and_their_averages(protocol, methods):
    published = load_transfer_published(protocol)
    targets = (registry.xd_targets if protocol == "xd" else registry.dg_targets)("imagenet")
    assert published.methods == methods
    for method in methods:
        assert {d for m, d in published.rows if m == method} == {"imagenet", *targets}
        # every printed average is the mean of its targets, to the printed rounding
        assert published.printed_average[method] == pytest.approx(
            statistics.fmean(published.get(method, t) for t in targets), abs=0.0051)
        assert published.sources[method].endswith(("Table 2", "Table 3", "Table 4"))


def test_shipped_values_of_each_paper():
    xd, dg = load_transfer_published("xd"), load_transfer_published("dg")
    assert [xd.get("MaPLe", d) for d in ("imagenet", "caltech101", "fgvc_aircraft", "eurosat")] == [
        70.72, 93.53, 24.74, 48.06]
    assert xd.printed_average == {"CoOp": 63.88, "CoCoOp": 65.74, "MaPLe": 66.30, "PromptSRC": 65.81}
    assert [dg.get("PromptSRC", d) for d in ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a",
                                             "imagenet_r")] == [71.27, 64.35, 49.55, 50.90, 77.80]
    assert dg.get("CLIP", "imagenet") == 66.73 and xd.method_name("clip") is None  # no zero-shot xd row
    assert xd.citation(["MaPLe", "CoOp", "CoCoOp"]) == (
        "CoOp, CoCoOp: CoCoOp (CVPR 2022) Table 2; MaPLe: MaPLe (CVPR 2023) Table 2")
    with pytest.raises(ValueError, match="no published transfer table for protocol 'base2new'"):
        load_transfer_published("base2new")


def write_transfer(root, protocol, trainer, config, accuracies, seeds=(1, 2, 3)):
    """``accuracies``: dataset -> accuracy (%) on 10,000 images, the same for every seed."""
    for dataset, acc in accuracies.items():
        role = "source" if dataset == "imagenet" else "target"
        for seed in seeds:
            write_log(seed_dir_path(root, protocol, trainer, config, dataset, role, 16, seed),
                      eval_log(round(acc * 100), 10000, trainer=trainer, dataset=dataset))


def test_xd_equal_to_published_gives_zero_deltas_and_the_printed_average(tmp_path):
    published = load_transfer_published("xd")
    targets = registry.xd_targets("imagenet")
    for trainer in ("MaPLe", "CoCoOp", "PromptSRC"):  # CoCoOp and PromptSRC match by their own name
        write_transfer(tmp_path, "xd", trainer, "cfg", {d: published.get(trainer, d) for d in ("imagenet", *targets)})
    write_transfer(tmp_path, "xd", "Spotlighter", "paper", {"imagenet": 72.0, "dtd": 50.0})
    table = transfer_table(collect(tmp_path, "xd"), "xd", root=tmp_path, published=published)
    assert table.columns == ["Dataset", "CoCoOp", "Pub. CoCoOp", "Δ CoCoOp", "MaPLe", "Pub. MaPLe", "Δ MaPLe",
                             "PromptSRC", "Pub. PromptSRC", "Δ PromptSRC", "Spotlighter"]
    average = table.rows[-1]
    for trainer in ("CoCoOp", "MaPLe", "PromptSRC"):
        col = table.columns.index(trainer)
        assert round(average[col].value, 2) == published.printed_average[trainer]
        assert round(average[col + 1].value, 2) == published.printed_average[trainer]
        assert all(abs(row[col + 2].value) < 1e-9 for row in table.rows)
    md = to_markdown(table)
    assert "| imagenet (source) | 71.02 ± 0.00 (3) | 71.02 | +0.00 | 70.72 ± 0.00 (3) | 70.72 | +0.00 |" in md
    assert ("Pub. = published accuracy (spotlighter/data/xd_published.csv: CoCoOp: CoCoOp (CVPR 2022) Table 2; "
            "MaPLe: MaPLe (CVPR 2023) Table 2; PromptSRC: PromptSRC (ICCV 2023) Table 3); "
            "Δ = ours − published") in md
    rows = list(csv.DictReader(io.StringIO(to_csv([table]))))
    maple_avg = next(r for r in rows if r["trainer"] == "MaPLe" and r["dataset"] == "average")
    assert (maple_avg["published_method"], maple_avg["pub_acc"], maple_avg["delta_acc"]) == ("MaPLe", "66.301", "0.0")
    spot = next(r for r in rows if r["trainer"] == "Spotlighter" and r["dataset"] == "dtd")
    assert (spot["published_method"], spot["pub_acc"], spot["delta_acc"]) == ("", "", "")


def test_dg_zero_shot_clip_compares_with_clip_over_the_targets_it_covers(tmp_path):
    write_transfer(tmp_path, "dg", "ZeroshotCLIP", "vit_b16",
                   {"imagenet": 66.0, "imagenetv2": 61.0, "imagenet_a": 48.0})
    table = transfer_table(collect(tmp_path, "dg"), "dg", root=tmp_path, published=load_transfer_published("dg"),
                           published_methods=["PromptSRC"])
    assert table.columns == ["Dataset", "ZeroshotCLIP", "Pub. ZeroshotCLIP", "Δ ZeroshotCLIP",
                             "PromptSRC (published)"]
    md = to_markdown(table)
    assert "| imagenetv2 | 61.00 ± 0.00 (3) | 60.83 | +0.17 | 64.35 |" in md
    assert "| imagenet_sketch | — [1] | 46.15 | — | 49.55 |" in md
    # our average covers imagenetv2 and imagenet_a; the published one is recomputed over the same two
    assert "| Average over targets (4) | 54.50 (2 of 4) [2] | 54.30 | +0.20 | 60.65 (4 of 4) |" in md
    assert "(ZeroshotCLIP with CLIP)" in table.meta
    assert table.chart.published["Accuracy"]["CLIP (published)"][1].mean == 60.83


def test_minibench_source_has_no_published_columns(tmp_path):
    write_transfer(tmp_path, "xd", "CoOp", "mb", {"minibench": 60.0})
    for seed in (1, 2, 3):
        write_log(seed_dir_path(tmp_path, "xd", "CoOp", "mb", "minibench_glyphs", "target", 16, seed,
                                source="minibench"), eval_log(500, 1000))
    table = transfer_table(collect(tmp_path, "xd", source="minibench"), "xd", root=tmp_path, source="minibench",
                           published=load_transfer_published("xd"))
    assert table.columns == ["Dataset", "CoOp"] and "Pub." not in table.meta


def test_cli_prints_xd_deltas_unless_no_published(tmp_path, capsys):
    write_transfer(tmp_path, "xd", "CoOp", "vit_b16_ep50", {"imagenet": 71.0, "dtd": 42.0})
    assert cli.main(["xd", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| Dataset | CoOp | Pub. CoOp | Δ CoOp |" in out
    assert "| dtd | 42.00 ± 0.00 (3) | 41.92 | +0.08 |" in out
    assert cli.main(["xd", "--root", str(tmp_path), "--no-published"]) == 0
    assert "| Dataset | CoOp |\n" in capsys.readouterr().out


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib")
def test_plot_published_draws_the_published_bars(tmp_path, capsys):
    from spotlighter.results.plot import draw_chart

    write_transfer(tmp_path / "out", "dg", "CoOp", "vit_b16_ep50", {"imagenet": 71.0, "imagenetv2": 63.0})
    table = transfer_table(collect(tmp_path / "out", "dg"), "dg", published=load_transfer_published("dg"))
    assert list(table.chart.published["Accuracy"]) == ["CoOp (published)"]
    plain, with_pub = draw_chart(table.chart, tmp_path / "a.png"), draw_chart(table.chart, tmp_path / "b.png",
                                                                                published=True)
    assert plain.read_bytes().startswith(PNG_SIGNATURE) and with_pub.read_bytes() != plain.read_bytes()
    assert cli.main(["dg", "--root", str(tmp_path / "out"), "--plot", str(tmp_path / "p.png"),
                     "--plot-published"]) == 0
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_SIGNATURE)


def test_base2new_trainer_of_another_codebase_compares_with_its_published_row(tmp_path):
    """PromptSRC (read from its own repository's output tree) has a published_method by its own name."""
    for seed in (1, 2, 3):
        for role, correct in (("base", 9533), ("new", 9730)):
            path = seed_dir_path(tmp_path, "base2new", "PromptSRC", "vit_b16_c2_ep20", "oxford_pets", role, 16, seed)
            write_log(path, eval_log(correct, 10000, trainer="PromptSRC"))
    table = base2new_table(collect(tmp_path, "base2new"), root=tmp_path, datasets=["oxford_pets"],
                           published=load_published())
    row = table.rows[0]
    assert row[table.columns.index("Pub. Base")].value == 95.33
    assert abs(row[table.columns.index("Δ Base")].value) < 1e-9 and abs(row[table.columns.index("Δ New")].value) < 1e-9
