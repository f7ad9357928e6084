"""Seed statistics, HM, Average rows, published comparison, Markdown and CSV of the three protocols."""

import csv
import io
import math

import pytest

from spotlighter.results import base2new_table, collect, load_published, to_csv, to_markdown, transfer_table
from spotlighter.results.constants import BASE2NEW_DATASETS
from spotlighter.results.layout import seed_dir_path
from spotlighter.results.record import make_record, write_record
from spotlighter.results.stats import harmonic_mean, summarize
from spotlighter.results.synthetic import eval_log, train_log, write_log

MAPLE, MAPLE_CFG = "MaPLe", "vit_b16_c2_ep5_batch4_2ctx"
SPOT, SPOT_CFG = "Spotlighter", "vit_b16_ep20_paper"
SHOWN = ["oxford_pets", "dtd", "eurosat"]  # the fixture's datasets (else all 11 are listed, 8 as missing)


def b2n_dir(root, trainer, config, dataset, role, seed):
    return seed_dir_path(root, "base2new", trainer, config, dataset, role, 16, seed)


def write_spotlighter(root, dataset, role, seed, correct, total=1000):
    path = b2n_dir(root, SPOT, SPOT_CFG, dataset, role, seed)
    write_record(str(path), make_record(
        trainer=SPOT, config=SPOT_CFG, preset="paper", dataset=dataset, subset=role, shots=16, seed=seed,
        split="test", correct=correct, total=total, macro_f1=70.0, epoch=20, wall_time_s=3.0, output_dir=str(path)))


@pytest.fixture
def b2n_root(tmp_path):
    """MaPLe (Dassl logs) and Spotlighter (result.json) on oxford_pets, dtd and eurosat.

    MaPLe: dtd has only Base (no test_new runs); eurosat New lacks seed 3 (its seed-3 Base is an
    unfinished training log). Spotlighter: complete on all three.
    """
    maple = {"oxford_pets": ((950, 953, 959), (970, 968, 966)),
             "dtd": ((800, 806, 812), None),
             "eurosat": ((900, 910, 920), (700, 720, None))}
    for dataset, (base, new) in maple.items():
        for seed in (1, 2, 3):
            finished = not (dataset == "eurosat" and seed == 3)
            write_log(b2n_dir(tmp_path, MAPLE, MAPLE_CFG, dataset, "base", seed),
                      train_log(base[seed - 1], 1000, style="maple", finished=finished))
            if new and new[seed - 1] is not None:
                write_log(b2n_dir(tmp_path, MAPLE, MAPLE_CFG, dataset, "new", seed), eval_log(new[seed - 1], 1000))
    spot = {"oxford_pets": (974, 977), "dtd": (760, 587), "eurosat": (850, 821)}
    for dataset, (base, new) in spot.items():
        for seed in (1, 2, 3):
            write_spotlighter(tmp_path, dataset, "base", seed, base + seed)
            write_spotlighter(tmp_path, dataset, "new", seed, new - seed)
    return tmp_path


def rows_by(table, trainer):
    """{dataset cell text: row} of one trainer."""
    col = table.columns.index("Trainer")
    return {row[0].value: row for row in table.rows if row[col].value == trainer}


def cell(table, row, column):
    return row[table.columns.index(column)]


def test_stats_sample_std_and_hm():
    stat = summarize([95.0, 95.3, 95.9])
    assert stat.mean == pytest.approx(95.4)
    assert stat.std == pytest.approx(math.sqrt((0.4**2 + 0.1**2 + 0.5**2) / 2))  # n - 1
    assert summarize([70.0]).std is None and summarize([]).mean is None
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_published_clip_average_matches_printed_row():
    published = load_published()
    avg = published.average("CLIP", BASE2NEW_DATASETS)
    assert (round(avg.base, 2), round(avg.new, 2), round(avg.hm, 2)) == (69.34, 74.22, 71.70)
    assert published.printed_average["CLIP"] == (69.34, 74.22, 71.70)
    assert published.get("CoOp w/ Spotlighter", "oxford_pets") == (97.40, 97.73, 97.56)
    assert published.average("CLIP", ["dtd", "not_a_dataset"]) is None


def test_ours_equal_to_published_clip_gives_its_average_and_zero_deltas(tmp_path):
    published = load_published()
    for dataset in BASE2NEW_DATASETS:
        row = published.get("CLIP", dataset)
        for seed in (1, 2, 3):
            write_log(b2n_dir(tmp_path, "ZeroshotCLIP", "vit_b16", dataset, "base", seed),
                      eval_log(round(row.base * 100), 10000, trainer="ZeroshotCLIP"))
            write_log(b2n_dir(tmp_path, "ZeroshotCLIP", "vit_b16", dataset, "new", seed),
                      eval_log(round(row.new * 100), 10000, trainer="ZeroshotCLIP"))
    table = base2new_table(collect(tmp_path, "base2new"), root=tmp_path, published=published)
    average = rows_by(table, "ZeroshotCLIP")["Average (11 of 11 datasets), HM of mean Base and mean New"]
    assert [round(cell(table, average, c).value, 2) for c in ("Base", "New", "HM")] == [69.34, 74.22, 71.70]
    assert [round(cell(table, average, c).value, 2) for c in ("Pub. Base", "Pub. New", "Pub. HM")] == [
        69.34, 74.22, 71.70]
    assert [abs(cell(table, average, c).value) < 1e-9 for c in ("Δ Base", "Δ New", "Δ HM")] == [True] * 3
    assert table.footnotes == []


def test_base2new_values_missing_markers_and_average(b2n_root):
    table = base2new_table(collect(b2n_root, "base2new"), root=b2n_root, datasets=SHOWN,
                           published=load_published())
    maple = rows_by(table, MAPLE)
    pets = maple["oxford_pets"]
    base, new, hm = (cell(table, pets, c).value for c in ("Base", "New", "HM"))
    assert (base.mean, base.n) == (pytest.approx(95.4), 3) and base.std == pytest.approx(math.sqrt(0.21))
    assert (new.mean, new.std) == (pytest.approx(96.8), pytest.approx(0.2))
    assert hm.mean == pytest.approx(2 * 95.4 * 96.8 / (95.4 + 96.8))  # HM of the seed means
    per_seed_hm = [harmonic_mean(b, n) for b, n in ((95.0, 97.0), (95.3, 96.8), (95.9, 96.6))]
    assert hm.std == pytest.approx(summarize(per_seed_hm).std)
    assert cell(table, pets, "Δ HM").value == pytest.approx(hm.mean - 96.58)  # MaPLe published HM

    dtd = maple["dtd"]  # only Base
    assert cell(table, dtd, "Base").value.mean == pytest.approx(80.6)
    assert not cell(table, dtd, "New").value.ok and not cell(table, dtd, "HM").value.ok
    assert "new: no run folder for this dataset" in table.footnotes[cell(table, dtd, "New").notes[0] - 1]

    euro = maple["eurosat"]  # seed 3: unfinished Base log, no New folder
    assert cell(table, euro, "Base").value.n == 2 and cell(table, euro, "New").value.n == 2
    notes = [table.footnotes[i - 1] for i in cell(table, euro, "HM").notes]
    assert any("eurosat base seed 3: unfinished training log" in n for n in notes)
    assert any("eurosat new: seed 3 missing (no folder in" in n for n in notes)

    average = maple["Average (1 of 3 datasets), HM of mean Base and mean New"]  # only oxford_pets is complete
    assert cell(table, average, "Base").value == pytest.approx(95.4)
    assert cell(table, average, "HM").value == pytest.approx(hm.mean)
    assert "excluded: dtd, eurosat" in table.footnotes[cell(table, average, "HM").notes[0] - 1]

    spot_avg = rows_by(table, SPOT)["Average (3 of 3 datasets), HM of mean Base and mean New"]
    b, n = (97.6 + 76.2 + 85.2) / 3, (97.5 + 58.5 + 81.9) / 3
    assert cell(table, spot_avg, "Base").value == pytest.approx(b)
    assert cell(table, spot_avg, "HM").value == pytest.approx(harmonic_mean(b, n))
    pub_b, pub_n = (97.40 + 76.04 + 85.01) / 3, (97.73 + 58.69 + 82.13) / 3
    assert cell(table, spot_avg, "Pub. HM").value == pytest.approx(harmonic_mean(pub_b, pub_n))
    assert cell(table, spot_avg, "Δ New").value == pytest.approx(n - pub_n)


def test_base2new_markdown(b2n_root):
    table = base2new_table(collect(b2n_root, "base2new"), root=b2n_root, datasets=SHOWN,
                           published=load_published())
    md = to_markdown(table)
    assert md.startswith("## Base-to-novel generalisation (16 shots)\n")
    assert f"root: `{b2n_root}` · shots: 16 · seeds: 1, 2, 3 (as found)" in md
    assert "| Dataset | Trainer | Base | New | HM | Pub. Base | Pub. New | Pub. HM | Δ Base | Δ New | Δ HM |" in md
    assert ("| oxford_pets | MaPLe | 95.40 ± 0.46 (3) | 96.80 ± 0.20 (3) | 96.09 ± 0.14 (3) | 95.43 | 97.76 "
            "| 96.58 | -0.03 | -0.96 | -0.49 |") in md
    assert "| oxford_pets | Spotlighter | 97.60 ± 0.10 (3) | 97.50 ± 0.10 (3) | 97.55 ± 0.00 (3) | 97.40 |" in md
    assert "| dtd | MaPLe | 80.60 ± 0.60 (3) | — [1] | — [1] | 80.36 | 59.18 | 68.16 | +0.24 | — | — |" in md
    assert "| Average (1 of 3 datasets), HM of mean Base and mean New | MaPLe | 95.40 [" in md
    assert "\n[1] MaPLe/vit_b16_c2_ep5_batch4_2ctx new: no run folder for this dataset (searched " in md
    # the unfinished log is shown as missing, never as its validation accuracy
    assert "91.00 ± " not in md and "seed 3: unfinished training log (no 'Finish training' line)" in md


def test_base2new_csv(b2n_root):
    table = base2new_table(collect(b2n_root, "base2new"), root=b2n_root, datasets=SHOWN,
                           published=load_published())
    rows = list(csv.DictReader(io.StringIO(to_csv([table]))))
    assert len(rows) == 2 * 3 + 2 * 2  # trainer x dataset, plus two averages (conventions) per trainer
    pets = next(r for r in rows if r["trainer"] == MAPLE and r["dataset"] == "oxford_pets")
    assert (pets["base_mean"], pets["base_std"], pets["base_n"]) == ("95.4", "0.4583", "3")
    assert (pets["published_method"], pets["pub_hm"], pets["complete"]) == ("MaPLe", "96.58", "True")
    assert float(pets["delta_base"]) == pytest.approx(95.4 - 95.43, abs=1e-4)
    dtd = next(r for r in rows if r["trainer"] == MAPLE and r["dataset"] == "dtd")
    assert (dtd["new_mean"], dtd["new_n"], dtd["hm_mean"], dtd["complete"]) == ("", "0", "", "False")
    assert "no run folder" in dtd["notes"]
    spot = next(r for r in rows if r["trainer"] == SPOT and r["dataset"] == "average")
    assert spot["config"] == SPOT_CFG and spot["published_method"] == "CoOp w/ Spotlighter"
    spot_hms = next(r for r in rows if r["trainer"] == SPOT and r["dataset"] == "average_of_hms")
    assert spot_hms["base_mean"] == spot["base_mean"] and spot_hms["hm_mean"] != spot["hm_mean"]


def test_suite_rows_and_both_averages_hand_computed(tmp_path):
    """A tree with two of the eleven published datasets lists the eleven in the published order (missing
    ones as missing) and prints both averages over the complete ones: HM(mean Base, mean New) -- the
    published convention -- and the mean of the per-dataset HMs, each labelled. Values computed by hand:
    datasets A (Base 60, New 40: HM 48) and B (Base 80, New 20: HM 32); mean Base 70, mean New 30,
    HM of the means 2*70*30/100 = 42; mean of the HMs (48 + 32)/2 = 40."""
    from spotlighter.registry import BASE2NEW_DATASETS

    a, b = "dtd", "eurosat"
    for dataset, (base, new) in ((a, (600, 400)), (b, (800, 200))):
        for seed in (1, 2):
            write_log(b2n_dir(tmp_path, "CoOp", "c", dataset, "base", seed), eval_log(base, 1000, trainer="CoOp"))
            write_log(b2n_dir(tmp_path, "CoOp", "c", dataset, "new", seed), eval_log(new, 1000, trainer="CoOp"))
    table = base2new_table(collect(tmp_path, "base2new"), root=tmp_path, published=None)
    assert [row[0].value for row in table.rows] == list(BASE2NEW_DATASETS) + [
        "Average (2 of 11 datasets), HM of mean Base and mean New",
        "Average (2 of 11 datasets), mean of per-dataset HMs"]
    coop = rows_by(table, "CoOp")
    assert cell(table, coop[a], "HM").value.mean == pytest.approx(48.0)
    assert cell(table, coop[b], "HM").value.mean == pytest.approx(32.0)
    hm_of_means = coop["Average (2 of 11 datasets), HM of mean Base and mean New"]
    mean_of_hms = coop["Average (2 of 11 datasets), mean of per-dataset HMs"]
    assert [cell(table, hm_of_means, c).value for c in ("Base", "New", "HM")] == pytest.approx([70.0, 30.0, 42.0])
    assert [cell(table, mean_of_hms, c).value for c in ("Base", "New", "HM")] == pytest.approx([70.0, 30.0, 40.0])
    md = to_markdown(table)
    assert "| Average (2 of 11 datasets), mean of per-dataset HMs | CoOp | 70.00" in md
    assert "| 40.00" in md and "| 42.00" in md


def test_published_average_in_both_conventions():
    """The published Average row is HM(mean Base, mean New); the other convention averages the HMs."""
    published = load_published()
    rows = [published.get("CLIP", d) for d in ("dtd", "eurosat")]
    got = published.mean_of_hms("CLIP", ["dtd", "eurosat"])
    assert got == pytest.approx([(rows[0].base + rows[1].base) / 2, (rows[0].new + rows[1].new) / 2,
                                 (rows[0].hm + rows[1].hm) / 2])
    assert published.mean_of_hms("CLIP", ["dtd", "not_a_dataset"]) is None


def test_seeds_option_marks_absent_seed_and_no_published_columns(b2n_root):
    results = collect(b2n_root, "base2new")
    table = base2new_table(results, root=b2n_root, seeds=[1, 2, 3, 4], datasets=SHOWN, published=None)
    assert "Pub. Base" not in table.columns
    md = to_markdown(table)
    assert "seeds: 1, 2, 3, 4 ·" in md and "(as found)" not in md
    assert "Average (0 of 3 datasets)" in md
    assert "oxford_pets base: seed 4 missing" in md


def test_config_column_when_a_trainer_has_two_configs(b2n_root):
    path = b2n_dir(b2n_root, SPOT, "vit_b16_ep20_release", "dtd", "base", 1)
    write_log(path, train_log(700, 1000, style="spotlighter"))
    table = base2new_table(collect(b2n_root, "base2new", trainers=["spotlighter"]), root=b2n_root)
    assert table.columns[:3] == ["Dataset", "Trainer", "Config"]
    configs = {row[2].value for row in table.rows}
    assert configs == {SPOT_CFG, "vit_b16_ep20_release"}


def test_published_methods_extra_rows_and_mapping(b2n_root):
    results = collect(b2n_root, "base2new")
    table = base2new_table(results, root=b2n_root, datasets=SHOWN, published=load_published(),
                           published_methods=["promptsrc", "MaPLe=CLIP"])
    src = rows_by(table, "PromptSRC (published)")
    assert cell(table, src["dtd"], "HM").value == 71.75
    assert cell(table, src["Average (3 of 3 datasets), HM of mean Base and mean New"], "Base").value == pytest.approx((95.33 + 83.37 + 92.90) / 3)
    maple_pets = rows_by(table, MAPLE)["oxford_pets"]
    assert cell(table, maple_pets, "Pub. Base").value == 91.17  # CLIP's row now
    with pytest.raises(ValueError, match="unknown published method 'NoSuch'"):
        base2new_table(results, published=load_published(), published_methods=["NoSuch"])


def test_cross_dataset_table(tmp_path):
    for seed, (src, caltech, dtd) in enumerate(((710, 930, 440), (712, 934, 446), (714, 938, None)), 1):
        write_log(seed_dir_path(tmp_path, "xd", "CoOp", "vit_b16_ep50", "imagenet", "source", 16, seed),
                  train_log(src, 1000, style="coop"))
        write_log(seed_dir_path(tmp_path, "xd", "CoOp", "vit_b16_ep50", "caltech101", "target", 16, seed),
                  eval_log(caltech, 1000, style="coop"))
        if dtd:
            write_log(seed_dir_path(tmp_path, "xd", "CoOp", "vit_b16_ep50", "dtd", "target", 16, seed),
                      eval_log(dtd, 1000, style="coop"))
    table = transfer_table(collect(tmp_path, "xd"), "xd", root=tmp_path, datasets=["caltech101", "dtd", "eurosat"])
    md = to_markdown(table)
    assert "| Dataset | CoOp |" in md
    assert "| imagenet (source) | 71.20 ± 0.20 (3) |" in md
    assert "| caltech101 | 93.40 ± 0.40 (3) |" in md
    assert "| dtd | 44.30 ± 0.42 (2) [1] |" in md
    assert "| eurosat | — [2] |" in md
    assert "| Average over targets (3) | 93.40 (1 of 3) [3] |" in md  # only caltech101 is complete
    rows = list(csv.DictReader(io.StringIO(to_csv([table]))))
    assert [(r["dataset"], r["role"], r["acc_n"]) for r in rows] == [
        ("imagenet", "source", "3"), ("caltech101", "target", "3"), ("dtd", "target", "2"),
        ("eurosat", "target", "0"), ("average", "average", "")]


def test_dg_table_lists_all_four_variants(tmp_path):
    for seed in (1, 2):
        write_log(seed_dir_path(tmp_path, "dg", SPOT, SPOT_CFG, "imagenet", "source", 16, seed),
                  train_log(720, 1000, style="spotlighter"))
        write_log(seed_dir_path(tmp_path, "dg", SPOT, SPOT_CFG, "imagenetv2", "target", 16, seed),
                  eval_log(640 + seed, 1000))
    table = transfer_table(collect(tmp_path, "dg"), "dg", root=tmp_path)
    assert [row[0].value for row in table.rows] == [
        "imagenet (source)", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r", "Average over targets (4)"]
    assert table.rows[1][1].value.mean == pytest.approx(64.15)
    assert table.rows[-1][1].value == pytest.approx(64.15) and table.rows[-1][1].suffix == " (1 of 4)"


def test_transductive_trainers_and_published_rows_are_marked():
    from spotlighter.results.constants import TRANSDUCTIVE_MARK, is_transductive
    from spotlighter.results.tables import Method, method_labels

    labels = method_labels([Method("PromptKD", "vit_b16_c2_ep20_batch8_4+4ctx"), Method("PromptSRC", "a")])
    assert labels[Method("PromptKD", "vit_b16_c2_ep20_batch8_4+4ctx")] == "PromptKD" + TRANSDUCTIVE_MARK
    assert labels[Method("PromptSRC", "a")] == "PromptSRC"
    spot = Method("SpotlighterKD", "vit_b16_ep30_batch64_release")
    assert method_labels([spot])[spot] == "SpotlighterKD" + TRANSDUCTIVE_MARK
    assert method_labels([spot], mark_transductive=False)[spot] == "SpotlighterKD"  # DG: distilled on the source
    assert is_transductive("PromptKD w/ Spotlighter") and is_transductive("PromptKD w/ TextRefiner")
    assert not is_transductive("CoOp w/ Spotlighter") and not is_transductive("PromptKDX")


def test_base2new_table_marks_distilling_rows_transductive(tmp_path):
    """The rendered base-to-novel table and its CSV records say which rows are transductive."""
    from spotlighter.results.constants import TRANSDUCTIVE_MARK

    for trainer, cfg in (("CoOp", "c"), ("PromptKD", "k")):
        for subset, correct in (("base", 600), ("new", 400)):
            write_log(b2n_dir(tmp_path, trainer, cfg, "dtd", subset, 1), eval_log(correct, 1000, trainer=trainer))
    table = base2new_table(collect(tmp_path, "base2new"), root=tmp_path, published=None)
    md = to_markdown(table)
    assert f"| dtd | PromptKD{TRANSDUCTIVE_MARK} |" in md and "| dtd | CoOp |" in md
    flags = {r["trainer"]: r["transductive"] for r in table.records if r["dataset"] == "dtd"}
    assert flags == {"CoOp": False, "PromptKD": True}
