"""result.json records: make_record, write_record (atomic), read_record validation."""

import json
import os
import re
from datetime import datetime, timezone

import pytest

import spotlighter
from spotlighter.results.record import SCHEMA, make_record, read_record, write_record

FIELDS = dict(
    trainer="Spotlighter", config="vit_b16_ep20_paper", preset="paper", dataset="oxford_pets", subset="base",
    shots=16, seed=1, split="test", correct=765, total=1000, macro_f1=76.1, epoch=20, wall_time_s=12.5,
    output_dir="output/base2new/train_base/oxford_pets/shots_16/Spotlighter/vit_b16_ep20_paper/seed1",
)


def test_make_record_fills_meta_and_exact_accuracy():
    record = make_record(**FIELDS)
    assert record["schema"] == SCHEMA == "spotlighter.result/1"
    assert record["version"] == spotlighter.__version__
    assert record["accuracy"] == 76.5
    assert record["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", record["commit"])
    stamp = datetime.fromisoformat(record["timestamp"])
    assert stamp.utcoffset() == timezone.utc.utcoffset(None)
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 60


def test_accuracy_must_equal_correct_over_total():
    assert make_record(**FIELDS, accuracy=100 * 765 / 1000)["accuracy"] == 76.5
    with pytest.raises(ValueError, match="'accuracy'.*76.5"):
        make_record(**FIELDS, accuracy=76.0)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("subset", "novel", "'subset'"),
        ("split", "train", "'split'"),
        ("shots", 16.0, "'shots'"),
        ("seed", True, "'seed'"),
        ("total", 0, "'total'"),
        ("macro_f1", float("nan"), "'macro_f1'"),
        ("config", "", "'config'"),
        ("epoch", -1, "'epoch'"),
    ],
)
def test_wrong_field_is_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        make_record(**{**FIELDS, field: value})


def test_missing_field_is_named():
    fields = {k: v for k, v in FIELDS.items() if k != "dataset"}
    with pytest.raises(ValueError, match="missing field 'dataset'"):
        make_record(**fields)


def test_correct_above_total_rejected():
    with pytest.raises(ValueError, match="'correct' \\(1001\\) exceeds 'total'"):
        make_record(**{**FIELDS, "correct": 1001})


def test_optional_fields_accept_none_and_extra_keys_are_kept():
    record = make_record(**{**FIELDS, "preset": None, "epoch": None}, backbone="ViT-B/16")
    assert record["preset"] is None and record["epoch"] is None and record["backbone"] == "ViT-B/16"


def test_write_then_read_round_trip_atomically(tmp_path):
    out = tmp_path / "seed1"
    record = make_record(**FIELDS)
    path = write_record(str(out), record)
    assert path == os.path.join(str(out), "result.json")
    assert sorted(os.listdir(out)) == ["result.json"]  # no temporary file left behind
    assert read_record(path) == record
    write_record(str(out), make_record(**{**FIELDS, "correct": 800}))
    assert read_record(path)["accuracy"] == 80.0


def test_write_rejects_record_without_meta(tmp_path):
    with pytest.raises(ValueError, match="missing field 'schema'"):
        write_record(str(tmp_path), dict(FIELDS, accuracy=76.5))
    assert not (tmp_path / "result.json").exists()


def test_read_rejects_invalid_files(tmp_path):
    bad_json = tmp_path / "a.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_record(bad_json)
    wrong_schema = tmp_path / "b.json"
    wrong_schema.write_text(json.dumps({**make_record(**FIELDS), "schema": "other/2"}))
    with pytest.raises(ValueError, match="'schema'"):
        read_record(wrong_schema)
