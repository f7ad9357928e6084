"""The results tool uses nothing it cannot check: records that contradict their folder, impossible numbers in
records and logs, CSV formula injection, and unwritable --csv / --plot paths."""

import csv
import importlib.util
import io
import json
import logging

import pytest

from spotlighter.results import cli
from spotlighter.results.layout import SeedDir, seed_dir_path
from spotlighter.results.parse import collect, parse_log_text, read_seed_dir
from spotlighter.results.record import make_record
from spotlighter.results.synthetic import eval_log, result_block, write_log
from spotlighter.results.tables import csv_safe, to_csv, transfer_table

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def seed_dir(root, *, role="base", trainer="CoOp", config="vit_b16_ep50", dataset="oxford_pets", seed=3,
             protocol="base2new", shots=16):
    path = seed_dir_path(root, protocol, trainer, config, dataset, role, shots, seed)
    return SeedDir(protocol, trainer, config, dataset, role, shots, seed, path)


def write_json(sd, **overrides):
    """A valid record of ``sd`` (765/1000) with ``overrides``, written as result.json."""
    subset = {"base": "base", "new": "new"}.get(sd.role, "all")
    fields = dict(trainer=sd.trainer, config=sd.config, preset=None, dataset=sd.dataset, subset=subset,
                  shots=sd.shots, seed=sd.seed, split="test", correct=765, total=1000, macro_f1=50.0,
                  epoch=None, wall_time_s=1.0, output_dir=str(sd.path))
    record = make_record(**fields)
    record.update(overrides)
    sd.path.mkdir(parents=True, exist_ok=True)
    path = sd.path / "result.json"
    path.write_text(json.dumps(record), encoding="utf-8")  # allow_nan: NaN is written as the token NaN
    return path


# ----------------------------------------------------------------------------- records vs their folder
@pytest.mark.parametrize("field, value, words", [
    ("trainer", "MaPLe", "trainer 'MaPLe', folder 'CoOp'"),
    ("dataset", "dtd", "dataset 'dtd', folder 'oxford_pets'"),
    ("seed", 42, "seed 42, folder 3"),
    ("shots", 8, "shots 8, folder 16"),
    ("config", "vit_b16_ep20", "config 'vit_b16_ep20', folder 'vit_b16_ep50'"),
])
def test_record_contradicting_its_folder_is_left_out_with_a_warning(tmp_path, caplog, field, value, words):
    sd = seed_dir(tmp_path)
    path = write_json(sd, **{field: value})
    with caplog.at_level(logging.WARNING):
        result = read_seed_dir(sd)
    assert result.accuracy is None and result.reason == "no result.json or log.txt*"
    assert f"ignoring {path}: it contradicts its folder ({words})" in caplog.text


def test_record_matching_its_folder_is_used_and_trainer_aliases_match(tmp_path, caplog):
    sd = seed_dir(tmp_path, trainer="ZeroshotCLIP", config="vit_b16")
    write_json(sd, trainer="zsclip")  # a CLI alias of the same trainer
    with caplog.at_level(logging.WARNING):
        assert read_seed_dir(sd).accuracy == 76.5
    assert caplog.text == ""


def test_target_record_may_say_null_shots_but_not_another_count(tmp_path, caplog):
    full = seed_dir(tmp_path, protocol="xd", role="target", dataset="dtd", seed=1)
    write_json(full, shots=None)  # evaluations on a target use its full test set
    assert read_seed_dir(full).accuracy == 76.5
    other = seed_dir(tmp_path, protocol="xd", role="target", dataset="dtd", seed=2)
    path = write_json(other, shots=4)
    with caplog.at_level(logging.WARNING):
        assert read_seed_dir(other).accuracy is None
    assert f"ignoring {path}: it contradicts its folder (shots 4, folder 16)" in caplog.text
    source = seed_dir(tmp_path, protocol="xd", role="source", dataset="imagenet", seed=1)
    write_json(source, shots=None)  # the source was trained on K shots: null contradicts it
    assert read_seed_dir(source).accuracy is None


def test_contradicting_record_falls_back_to_the_log_and_is_not_averaged(tmp_path, caplog):
    sd = seed_dir(tmp_path, seed=3)
    write_json(sd, seed=42, correct=10, accuracy=1.0)
    write_log(sd.path, eval_log(900, 1000, trainer="CoOp"))
    with caplog.at_level(logging.WARNING):
        result = read_seed_dir(sd)
    assert result.accuracy == 90.0 and result.source.endswith("log.txt")
    assert "seed 42, folder 3" in caplog.text


# ----------------------------------------------------------------------------- impossible numbers
@pytest.mark.parametrize("overrides, words", [
    ({"correct": 1500, "accuracy": 150.0}, "field 'correct' (1500) exceeds 'total' (1000)"),
    ({"correct": -5, "accuracy": -0.5}, "field 'correct' must be an int >= 0, got -5"),
    ({"total": -1000}, "field 'total' must be an int > 0, got -1000"),
    ({"accuracy": float("nan")}, "field 'accuracy' must be a float percent"),
    ({"accuracy": 150.0}, "field 'accuracy' must be 100*correct/total = 76.5, got 150.0"),
    ({"macro_f1": 101.0}, "field 'macro_f1' must be a float percent in [0, 100], got 101.0"),
])
def test_record_with_impossible_numbers_is_left_out_naming_the_file(tmp_path, caplog, overrides, words):
    sd = seed_dir(tmp_path)
    path = write_json(sd, **overrides)
    with caplog.at_level(logging.WARNING):
        assert read_seed_dir(sd).accuracy is None
    assert f"ignoring invalid {path}: result record: {words}" in caplog.text


@pytest.mark.parametrize("block, words", [
    (result_block(1500, 1000), "correct (1500) exceeds total (1000)"),
    ("=> result\n* accuracy: 150.0%\n* error: -50.0%\n", "accuracy 150.0% outside 0-100"),
    ("=> result\n* accuracy: nan%\n", "accuracy nan% outside 0-100"),
    ("=> result\n* total: 1,000\n* correct: -5\n* accuracy: -0.5%\n", "impossible counts (correct -5, total 1000)"),
    ("=> result\n* total: 0\n* correct: 0\n* accuracy: 0.0%\n", "impossible counts (correct 0, total 0)"),
    ("=> result\n* total: 1,000\n* correct: 900\n* accuracy: 9.0%\n",
     "printed accuracy 9.0% is not 100 * correct / total = 90.0000%"),
])
def test_log_with_an_impossible_result_has_none(block, words):
    outcome = parse_log_text("Evaluate on the *test* set\n" + block)
    assert outcome.block is None
    assert outcome.reason == f"impossible result at line 2: {words}"


def test_impossible_newest_log_is_skipped_with_a_warning_for_the_older_valid_one(tmp_path, caplog):
    sd = seed_dir(tmp_path, role="new")
    write_log(sd.path, eval_log(800, 1000))
    newest = write_log(sd.path, "Evaluate on the *test* set\n" + result_block(1200, 1000), "2026-01-02-10-00-00")
    with caplog.at_level(logging.WARNING):
        result = read_seed_dir(sd)
    assert result.accuracy == 80.0 and result.source.endswith("log.txt")
    assert "impossible result" in result.reason  # the table footnotes why the older log was used
    assert f"ignoring {newest}: impossible result at line 2: correct (1200) exceeds total (1000)" in caplog.text


def test_plausible_log_values_still_parse():
    outcome = parse_log_text("=> result\n* total: 1,000\n* correct: 1,000\n* accuracy: 100.0%\n")
    assert outcome.block.accuracy == 100.0 and outcome.reason is None


# ----------------------------------------------------------------------------- CSV injection
def test_csv_safe_escapes_formula_strings_only():
    assert [csv_safe(v) for v in ("=1+1", "+cmd", "-2+3", "@SUM(A1)", "\tx", "CoOp", "")] == [
        "'=1+1", "'+cmd", "'-2+3", "'@SUM(A1)", "'\tx", "CoOp", ""]
    assert [csv_safe(v) for v in (-0.29, -3, True, None)] == [-0.29, -3, True, None]


def test_csv_cells_from_folder_names_are_escaped_and_negative_numbers_kept(tmp_path):
    trainer, config = "=HYPERLINK(evil)", "@cfg"
    for seed in (1, 2):
        write_log(seed_dir_path(tmp_path, "xd", trainer, config, "imagenet", "source", 16, seed),
                  eval_log(700 + seed, 1000))
        write_log(seed_dir_path(tmp_path, "xd", "CoOp", "vit_b16", "imagenet", "source", 16, seed),
                  eval_log(700, 1000))
    from spotlighter.results.published import load_transfer_published

    table = transfer_table(collect(tmp_path, "xd"), "xd", root=tmp_path, published=load_transfer_published("xd"))
    rows = list(csv.DictReader(io.StringIO(to_csv([table]))))
    evil = next(r for r in rows if r["config"] == "'@cfg")
    assert evil["trainer"] == "'=HYPERLINK(evil)" and evil["acc_mean"] == "70.15"
    coop = next(r for r in rows if r["trainer"] == "CoOp")
    assert coop["delta_acc"] == "-1.51"  # 70.00 - 71.51: a number, not escaped


# ----------------------------------------------------------------------------- unwritable outputs
@pytest.fixture
def xd_root(tmp_path):
    for seed in (1, 2):
        write_log(seed_dir_path(tmp_path / "out", "xd", "CoOp", "vit_b16", "imagenet", "source", 16, seed),
                  eval_log(700, 1000))
    return tmp_path / "out"


def test_unwritable_csv_path_is_one_line_and_exit_2(xd_root, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = blocker / "t.csv"  # under a regular file: fails for every user, root included
    assert cli.main(["xd", "--root", str(xd_root), "--csv", str(target)]) == 2
    err = capsys.readouterr().err
    assert err == f"spotlighter-results: cannot write the CSV to {target}: File exists\n" or \
        err == f"spotlighter-results: cannot write the CSV to {target}: Not a directory\n"


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib")
def test_unwritable_plot_path_is_one_line_and_exit_2(xd_root, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = blocker / "plots"
    assert cli.main(["xd", "--root", str(xd_root), "--plot", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spotlighter-results: cannot write the plot to {target}: ")
    assert err.count("\n") == 1 and "Traceback" not in err
