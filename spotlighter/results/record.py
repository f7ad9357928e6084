"""The ``result.json`` record a trainer writes after each test evaluation."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from spotlighter import __version__
from spotlighter.fileio import atomic_path

from ..output_tree import RESULT_FILE

SCHEMA = "spotlighter.result/1"
SUBSETS = ("base", "new", "all")
SPLITS = ("test", "val")
ACCURACY_TOLERANCE = 1e-6  # percent points between ``accuracy`` and 100 * correct / total
GIT_TIMEOUT_S = 5


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


# field -> (check, description of what it must be)
REQUIRED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "trainer": (_is_str, "a non-empty str (Dassl trainer class name)"),
    "config": (_is_str, "a non-empty str (trainer config file stem)"),
    "preset": (_optional(_is_str), "a non-empty str or None"),
    "dataset": (_is_str, "a non-empty str (dataset config stem)"),
    "subset": (lambda v: v in SUBSETS, f"one of {SUBSETS}"),
    # None: the full training/test set (cross-dataset and DG evaluations do not subsample shots)
    "shots": (lambda v: v is None or (_is_int(v) and v >= 0), "an int >= 0 or null"),
    "seed": (_is_int, "an int"),
    "split": (lambda v: v in SPLITS, f"one of {SPLITS}"),
    "correct": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "total": (lambda v: _is_int(v) and v > 0, "an int > 0"),
    "accuracy": (_is_number, "a float percent (100 * correct / total)"),
    "macro_f1": (lambda v: _is_number(v) and 0 <= v <= 100, "a float percent in [0, 100]"),
    "epoch": (_optional(lambda v: _is_int(v) and v >= 0), "an int >= 0 or None"),
    "wall_time_s": (lambda v: _is_number(v) and v >= 0, "a float >= 0"),
    "output_dir": (_is_str, "a non-empty str"),
}
META_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "schema": (lambda v: v == SCHEMA, repr(SCHEMA)),
    "version": (_is_str, "a non-empty str"),
    "commit": (_optional(_is_str), "a str or None"),
    "timestamp": (_is_str, "an ISO 8601 str"),
}


def validate_record(record: dict[str, Any], *, require_meta: bool = True) -> None:
    """Raise ValueError naming the first missing or wrong field of ``record``."""
    if not isinstance(record, dict):
        raise ValueError(f"a result record must be a dict, got {type(record).__name__}")
    fields = {**(META_FIELDS if require_meta else {}), **REQUIRED_FIELDS}
    for name, (check, expected) in fields.items():
        if name not in record:
            raise ValueError(f"result record: missing field {name!r} (must be {expected})")
        if not check(record[name]):
            raise ValueError(f"result record: field {name!r} must be {expected}, got {record[name]!r}")
    if record["correct"] > record["total"]:
        raise ValueError(f"result record: field 'correct' ({record['correct']}) exceeds 'total' ({record['total']})")
    exact = 100.0 * record["correct"] / record["total"]
    if abs(record["accuracy"] - exact) > ACCURACY_TOLERANCE:
        raise ValueError(
            f"result record: field 'accuracy' must be 100*correct/total = {exact!r}, got {record['accuracy']!r}"
        )


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the repository holding this file, or None; never raises."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except Exception:  # noqa: BLE001 - no git, no repository, timeout: all mean "unknown"
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def make_record(**fields: Any) -> dict[str, Any]:
    """Return a validated record: ``fields`` plus schema, version, commit and UTC timestamp.

    ``accuracy`` may be left out: it is then computed as 100 * correct / total.
    """
    record = dict(fields)
    if "accuracy" not in record and _is_int(record.get("correct")) and _is_int(record.get("total")):
        if record["total"] > 0:
            record["accuracy"] = 100.0 * record["correct"] / record["total"]
    for number in ("accuracy", "macro_f1", "wall_time_s"):
        if _is_int(record.get(number)):
            record[number] = float(record[number])
    record.update(
        schema=SCHEMA,
        version=__version__,
        commit=git_commit(),
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    validate_record(record)
    return record


def write_record(output_dir: str, record: dict[str, Any]) -> str:
    """Atomically write ``record`` to ``<output_dir>/result.json``; return the path."""
    validate_record(record)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RESULT_FILE)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return path


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a ``result.json``; ValueError when it is not a valid record."""
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    try:
        validate_record(record)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return record
