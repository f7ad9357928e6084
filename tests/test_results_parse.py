"""Reading one accuracy per seed folder: result.json first, then Dassl logs of CoOp/MaPLe/Spotlighter."""

import os
import time

import pytest

from spotlighter.results.layout import SeedDir, seed_dir_path
from spotlighter.results.parse import collect, log_files_newest_first, parse_log_text, read_seed_dir
from spotlighter.results.record import make_record, write_record
from spotlighter.results.synthetic import eval_log, result_block, train_log, write_log


def seed_dir(tmp_path, role="base", trainer="CoOp", config="vit_b16_ep50", dataset="dtd", seed=1,
             protocol="base2new", shots=16):
    path = seed_dir_path(tmp_path, protocol, trainer, config, dataset, role, shots, seed)
    return SeedDir(protocol, trainer, config, dataset, role, shots, seed, path)


def record_for(sd: SeedDir, correct: int, total: int = 1000, **overrides):
    subset = {"base": "base", "new": "new"}.get(sd.role, "all")
    fields = dict(trainer=sd.trainer, config=sd.config, preset=None, dataset=sd.dataset, subset=subset,
                  shots=sd.shots, seed=sd.seed, split="test", correct=correct, total=total, macro_f1=50.0,
                  epoch=None, wall_time_s=1.0, output_dir=str(sd.path))
    fields.update(overrides)
    return make_record(**fields)


# ----------------------------------------------------------------------------- single logs
def test_coop_train_log_exact_accuracy_from_counts():
    outcome = parse_log_text(train_log(3283, 3669, style="coop", trainer="CoOp"))
    assert outcome.is_train and outcome.reason is None
    assert "89.48%" in train_log(3283, 3669, style="coop")  # printed, rounded
    assert outcome.block.accuracy == pytest.approx(100 * 3283 / 3669, abs=1e-12)  # 89.4794...
    assert (outcome.block.correct, outcome.block.total) == (3283, 3669)


def test_spotlighter_train_log_ignores_val_blocks_before_finish():
    text = train_log(765, 1000, style="spotlighter", trainer="Spotlighter", epochs=3, val=(60, 64))
    assert text.count("=> result") == 4  # three validation blocks, one test block
    outcome = parse_log_text(text)
    assert outcome.block.accuracy == 76.5
    assert outcome.block.macro_f1 == 76.1


def test_unfinished_train_log_is_missing_never_its_val_block():
    text = train_log(765, 1000, style="spotlighter", epochs=3, finished=False)
    assert "=> result" in text
    outcome = parse_log_text(text)
    assert outcome.block is None
    assert "unfinished training log" in outcome.reason and "Finish training" in outcome.reason


def test_training_killed_before_its_first_epoch_is_an_unfinished_training():
    ours = "Command: python train.py --root data --trainer CoOp --output-dir o\n** Config **\nLoading dataset\n"
    outcome = parse_log_text(ours)
    assert outcome.is_train and outcome.block is None
    assert outcome.reason == "unfinished training log (no 'Finish training' line)"
    coop = "** Arguments **\nbackbone: \neval_only: False\nhead: \n** Config **\nBuilding transform_train\n"
    assert parse_log_text(coop).reason == "unfinished training log (no 'Finish training' line)"
    eval_only = ours.replace("train.py", "train.py --eval-only")
    assert parse_log_text(eval_only).reason.startswith("eval-only log without")
    assert parse_log_text("Loading dataset\n").reason.startswith("log (neither training nor evaluation finished)")
    assert parse_log_text(coop.replace("False", "True")).reason.startswith("eval-only log without")


def test_train_log_without_test_block_after_finish_is_missing():
    text = train_log(765, 1000, style="maple").split("Evaluate on the *test* set")[0]
    outcome = parse_log_text(text)
    assert outcome.block is None and "after 'Finish training'" in outcome.reason


def test_eval_only_log_takes_last_block_and_needs_no_finish():
    text = eval_log(500, 1000) + "Evaluate on the *test* set\n" + result_block(731, 1000)
    outcome = parse_log_text(text)
    assert not outcome.is_train
    assert outcome.block.accuracy == 73.1


def test_truncated_block_is_skipped():
    text = eval_log(800, 1000) + "=> result\n* total: 1,000\n"
    assert parse_log_text(text).block.accuracy == 80.0
    assert parse_log_text("=> result\n* total: 1,000\n").reason.startswith("log (neither training nor evaluation")


def test_printed_accuracy_used_when_counts_absent():
    text = "Evaluate on the *test* set\n=> result\n* accuracy: 64.3%\n* error: 35.7%\n"
    assert parse_log_text(text).block.accuracy == 64.3


# ----------------------------------------------------------------------------- seed folders
def test_newest_valid_rerun_log_wins(tmp_path):
    sd = seed_dir(tmp_path)
    first = write_log(sd.path, train_log(700, 1000, style="coop"))
    rerun = write_log(sd.path, train_log(710, 1000, style="coop"), "2024-01-31-12-00-00")
    newest = write_log(sd.path, train_log(0, 1000, style="coop", finished=False), "2024-02-01-09-30-00")
    # mtimes say the opposite of the names: the timestamp in the name decides
    for age, path in enumerate((newest, rerun, first)):
        os.utime(path, (time.time() - 100 * (3 - age),) * 2)
    assert [p.name for p in log_files_newest_first(sd.path)] == [newest.name, rerun.name, "log.txt"]
    result = read_seed_dir(sd)
    assert result.accuracy == 71.0 and result.source == str(rerun)
    # not silently: the unfinished newest re-run is named (the table shows it as a footnote)
    assert result.reason.startswith(f"newest log {newest} has no result") and str(rerun) in result.reason


def test_all_logs_invalid_reports_newest_reason(tmp_path):
    sd = seed_dir(tmp_path)
    write_log(sd.path, train_log(700, 1000, finished=False))
    write_log(sd.path, train_log(700, 1000, finished=False), "2024-01-31-12-00-00")
    result = read_seed_dir(sd)
    assert not result.ok
    assert "unfinished training log" in result.reason
    assert "log.txt-2024-01-31-12-00-00" in result.reason and "1 older log" in result.reason


def test_result_json_preferred_over_logs(tmp_path):
    sd = seed_dir(tmp_path, trainer="Spotlighter", config="vit_b16_ep20_paper")
    write_log(sd.path, train_log(700, 1000, style="spotlighter"))
    write_record(str(sd.path), record_for(sd, 777, 1001))
    result = read_seed_dir(sd)
    assert result.accuracy == pytest.approx(100 * 777 / 1001)
    assert result.source.endswith("result.json") and result.macro_f1 == 50.0


@pytest.mark.parametrize("overrides", [{"split": "val"}, {"subset": "new"}])
def test_result_json_of_wrong_split_or_subset_falls_back_to_log(tmp_path, overrides):
    sd = seed_dir(tmp_path, role="base")
    write_log(sd.path, train_log(700, 1000))
    write_record(str(sd.path), record_for(sd, 999, **overrides))
    assert read_seed_dir(sd).accuracy == 70.0


def test_empty_seed_folder_is_missing(tmp_path):
    sd = seed_dir(tmp_path)
    sd.path.mkdir(parents=True)
    result = read_seed_dir(sd)
    assert not result.ok and result.reason == "no result.json or log.txt*"


# ----------------------------------------------------------------------------- trees
def build_transfer_tree(root):
    for seed in (1, 2):
        write_log(seed_dir_path(root, "xd", "CoOp", "vit_b16_ep50", "imagenet", "source", 16, seed),
                  train_log(700 + seed, 1000, style="coop"))
        for target in ("dtd", "imagenet_a", "minibench"):
            write_log(seed_dir_path(root, "xd", "CoOp", "vit_b16_ep50", target, "target", 16, seed),
                      eval_log(600 + seed, 1000, style="coop"))


def test_collect_cross_dataset_and_dg_split_targets(tmp_path):
    build_transfer_tree(tmp_path)
    xd = collect(tmp_path, "xd")
    dg = collect(tmp_path, "dg")
    assert {(r.dataset, r.role) for r in xd} == {("imagenet", "source"), ("dtd", "target"), ("minibench", "target")}
    assert {(r.dataset, r.role) for r in dg} == {("imagenet", "source"), ("imagenet_a", "target")}
    source = sorted((r for r in xd if r.role == "source"), key=lambda r: r.seed)
    assert [(r.config, r.shots, r.seed, r.accuracy) for r in source] == [
        ("vit_b16_ep50", 16, 1, 70.1), ("vit_b16_ep50", 16, 2, 70.2)]


def test_collect_filters(tmp_path):
    build_transfer_tree(tmp_path)
    zs = seed_dir_path(tmp_path, "base2new", "ZeroshotCLIP", "vit_b16", "dtd", "base", 16, 1)
    write_log(zs, eval_log(532, 1000, trainer="ZeroshotCLIP"))  # zero-shot train_base: eval-only is fine
    assert [r.accuracy for r in collect(tmp_path, "base2new", trainers=["zsclip"])] == [53.2]
    assert collect(tmp_path, "base2new", trainers=["coop"]) == []
    only_dtd = collect(tmp_path, "xd", trainers=["COOP"], datasets=["dtd"], seeds=[2])
    assert sorted((r.dataset, r.seed) for r in only_dtd) == [("dtd", 2), ("imagenet", 2)]  # source kept
    assert collect(tmp_path, "xd", shots=[4]) == [] and collect(tmp_path, "xd", configs=["other"]) == []


def test_collect_unknown_protocol(tmp_path):
    with pytest.raises(ValueError, match="unknown protocol 'linear_probe'"):
        collect(tmp_path, "linear_probe")
