"""Read one accuracy per seed folder (``result.json`` first, Dassl ``log.txt*`` as fallback)."""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..output_tree import (EPOCH_PATTERN, FINISH_SIGNAL, LOG_FILE, LOG_TIMESTAMP_FORMAT, RESULT_FILE,
                           RESULT_SIGNAL, ROLE_FEWSHOT, ROLE_SOURCE, ROLE_SUBSET, ROLE_TARGET, ZERO_SHOT_SHOTS)
from .constants import TRAINER_ALIASES, XD_SOURCE
from .layout import SeedDir, discover
from .record import read_record

logger = logging.getLogger(__name__)

# Numbers may be negative or non-finite in a corrupt log: they are read, then rejected by ``implausible``.
_ITEM_RE = re.compile(
    r"^\*\s*(total|correct|accuracy|error|macro_f1):\s*(-?[\d,]+(?:\.\d+)?|-?nan|-?inf)\s*%?\s*$", re.IGNORECASE)
#: Percent points a printed ``accuracy`` may differ from 100 * correct / total (Dassl prints 1-2 decimals).
PRINTED_ACCURACY_TOLERANCE = 0.05 + 1e-9
_EPOCH_RE = re.compile(EPOCH_PATTERN)
#: Dassl-style train.py scripts print their arguments (CoOp, MaPLe: ``eval_only: False``); ours prints
#: its command line. Either says whether a log is a training, even one killed before its first epoch.
_EVAL_ONLY_ARG_RE = re.compile(r"^eval_only:\s*(True|False)\s*$")
_COMMAND_PREFIX = "Command: "
IMPOSSIBLE = "impossible result"
HEADER_LINES = 500  # the arguments/command come first; never scan a whole long log for them


def declared_training(lines: list[str]) -> bool | None:
    """True/False when the log's header says it is a training / an evaluation, None if it says nothing."""
    for line in lines[:HEADER_LINES]:
        if line.startswith(_COMMAND_PREFIX) and "train.py" in line:
            return "--eval-only" not in line.split()
        match = _EVAL_ONLY_ARG_RE.match(line.strip())
        if match:
            return match.group(1) == "False"
    return None


@dataclass(frozen=True)
class EvalBlock:
    """One ``=> result`` block of a Dassl log (accuracy exact when correct/total are printed)."""

    line: int
    accuracy: float
    correct: int | None
    total: int | None
    macro_f1: float | None
    printed_accuracy: float | None = None

    def implausible(self) -> str | None:
        """Why these numbers cannot be a test result (negative counts, correct > total, an accuracy that is
        not finite, outside 0-100 or not 100 * correct / total), or None."""
        if self.correct is not None and self.correct < 0 or self.total is not None and self.total <= 0:
            return f"impossible counts (correct {self.correct}, total {self.total})"
        if self.correct is not None and self.total is not None and self.correct > self.total:
            return f"correct ({self.correct}) exceeds total ({self.total})"
        if not math.isfinite(self.accuracy) or not 0.0 <= self.accuracy <= 100.0:
            return f"accuracy {self.accuracy}% outside 0-100"
        printed = self.printed_accuracy
        if printed is not None and (not math.isfinite(printed)
                                    or abs(printed - self.accuracy) > PRINTED_ACCURACY_TOLERANCE):
            return f"printed accuracy {printed}% is not 100 * correct / total = {self.accuracy:.4f}%"
        return None


@dataclass(frozen=True)
class LogOutcome:
    """The test result a log holds, or why it holds none."""

    path: str
    block: EvalBlock | None
    reason: str | None
    is_train: bool


@dataclass(frozen=True)
class Result:
    """One (trainer, config, dataset, role, shots, seed): its accuracy, or why it is missing."""

    protocol: str
    trainer: str
    config: str
    dataset: str
    role: str
    shots: int
    seed: int
    path: str
    accuracy: float | None = None
    correct: int | None = None
    total: int | None = None
    macro_f1: float | None = None
    source: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.accuracy is not None


def _count(text: str | None) -> int | None:
    if text is None:
        return None
    value = float(text.replace(",", ""))
    return int(value) if math.isfinite(value) else -1  # a non-finite count is impossible: flag it as negative


def _block_from_items(line: int, items: dict[str, str]) -> EvalBlock | None:
    correct, total = _count(items.get("correct")), _count(items.get("total"))
    macro_f1 = float(items["macro_f1"]) if "macro_f1" in items else None
    printed = float(items["accuracy"].replace(",", "")) if "accuracy" in items else None
    if correct is not None and total:
        return EvalBlock(line, 100.0 * correct / total, correct, total, macro_f1, printed)
    if printed is not None:
        return EvalBlock(line, printed, correct, total, macro_f1)
    return None  # truncated block


def parse_blocks(lines: Sequence[str]) -> list[EvalBlock]:
    """Every complete ``=> result`` block, in order, with the index of its first line."""
    blocks: list[EvalBlock] = []
    for start, line in enumerate(lines):
        if line.strip() != RESULT_SIGNAL:
            continue
        items: dict[str, str] = {}
        for item_line in lines[start + 1 :]:
            match = _ITEM_RE.match(item_line.strip())
            if not match:
                break
            items[match.group(1).lower()] = match.group(2)
        block = _block_from_items(start, items)
        if block is not None:
            blocks.append(block)
    return blocks


def parse_log_text(text: str, path: str = "") -> LogOutcome:
    """The test result of one log: after ``Finish training`` in a train log, else the last block; a block
    with impossible numbers is no result (its reason says why)."""
    outcome = _parse_log_text(text, path)
    block = outcome.block
    problem = block.implausible() if block is not None else None
    if block is not None and problem:
        return LogOutcome(path, None, f"{IMPOSSIBLE} at line {block.line + 1}: {problem}", outcome.is_train)
    return outcome


def _parse_log_text(text: str, path: str = "") -> LogOutcome:
    lines = text.splitlines()
    declared = declared_training(lines)
    is_train = any(_EPOCH_RE.search(line) for line in lines) or declared is True
    blocks = parse_blocks(lines)
    if not is_train:
        if not blocks:
            what = "eval-only log" if declared is False else "log (neither training nor evaluation finished)"
            return LogOutcome(path, None, f"{what} without a '{RESULT_SIGNAL}' block", False)
        return LogOutcome(path, blocks[-1], None, False)
    finish = [i for i, line in enumerate(lines) if line.strip() == FINISH_SIGNAL]
    if not finish:
        return LogOutcome(path, None, f"unfinished training log (no '{FINISH_SIGNAL}' line)", True)
    after = [b for b in blocks if b.line > finish[-1]]
    if not after:
        return LogOutcome(path, None, f"training log without a test '{RESULT_SIGNAL}' after '{FINISH_SIGNAL}'", True)
    return LogOutcome(path, after[-1], None, True)


def parse_log(path: str | Path) -> LogOutcome:
    """``parse_log_text`` of a file (undecodable bytes are replaced)."""
    return parse_log_text(Path(path).read_text(encoding="utf-8", errors="replace"), str(path))


def _log_age(path: Path) -> float:
    """Sort key, larger is newer: ``log.txt`` is the first run, re-runs carry a start timestamp."""
    if path.name == LOG_FILE:
        return -math.inf
    suffix = path.name[len(LOG_FILE) :].lstrip("-")
    try:
        return time.mktime(time.strptime(suffix, LOG_TIMESTAMP_FORMAT))
    except ValueError:
        return path.stat().st_mtime


def log_files_newest_first(seed_dir: str | Path) -> list[Path]:
    """``log.txt`` and its re-run siblings ``log.txt-<timestamp>``, newest first."""
    logs = [p for p in Path(seed_dir).glob(f"{LOG_FILE}*") if p.is_file()]
    return sorted(logs, key=_log_age, reverse=True)


def _from_record(seed: SeedDir) -> Result | None:
    path = seed.path / RESULT_FILE
    if not path.is_file():
        return None
    try:
        record = read_record(path)
    except (OSError, ValueError) as exc:
        logger.warning("ignoring invalid %s", exc)  # the message starts with the file
        return None
    expected_subset = ROLE_SUBSET[seed.role]
    if record["split"] != "test" or record["subset"] != expected_subset:
        logger.warning(
            "ignoring %s: split=%r subset=%r, expected split='test' subset=%r",
            path, record["split"], record["subset"], expected_subset,
        )
        return None
    contradictions = record_contradictions(record, seed)
    if contradictions:
        logger.warning("ignoring %s: it contradicts its folder (%s)", path, "; ".join(contradictions))
        return None
    return _result(
        seed,
        accuracy=100.0 * record["correct"] / record["total"],
        correct=record["correct"],
        total=record["total"],
        macro_f1=record["macro_f1"],
        source=str(path),
    )


def record_contradictions(record: dict, seed: SeedDir) -> list[str]:
    """Where a ``result.json`` disagrees with the folder it sits in: trainer, config, dataset, seed, shots.

    Trainers compare through their aliases, case-insensitively. Shots: the folder's K, or null for an
    evaluation on a cross-dataset / DG target (those evaluate on the full test set).
    """
    found = []
    if canonical_trainer(record["trainer"]).lower() != canonical_trainer(seed.trainer).lower():
        found.append(f"trainer {record['trainer']!r}, folder {seed.trainer!r}")
    for key, folder in (("config", seed.config), ("dataset", seed.dataset), ("seed", seed.seed)):
        if record[key] != folder:
            found.append(f"{key} {record[key]!r}, folder {folder!r}")
    # a cross-dataset / DG target, or a zero-shot model's few-shot folder (<cfg>_0shots): the full sets
    full = seed.role == ROLE_TARGET or (seed.role == ROLE_FEWSHOT and seed.shots == ZERO_SHOT_SHOTS)
    allowed = (seed.shots, None) if full else (seed.shots,)
    if record["shots"] not in allowed:
        found.append(f"shots {record['shots']!r}, folder {seed.shots!r}")
    return found


def _from_logs(seed: SeedDir) -> Result:
    logs = log_files_newest_first(seed.path)
    if not logs:
        return _result(seed, reason=f"no {RESULT_FILE} or {LOG_FILE}*")
    newest: LogOutcome | None = None
    for path in logs:  # newest first; older logs are read only when the newer ones hold no result
        outcome = parse_log(path)
        newest = newest or outcome
        if outcome.block is not None:
            block = outcome.block
            note = None  # a value from an older log than the newest is shown with a footnote
            if outcome is not newest:
                note = (f"newest log {newest.path} has no result ({newest.reason}); "
                        f"the value is from the older {outcome.path}")
            return _result(seed, accuracy=block.accuracy, correct=block.correct, total=block.total,
                           macro_f1=block.macro_f1, source=outcome.path, reason=note)
        if outcome.reason and outcome.reason.startswith(IMPOSSIBLE):
            logger.warning("ignoring %s: %s", outcome.path, outcome.reason)
        else:
            logger.info("skipping %s: %s", outcome.path, outcome.reason)
    assert newest is not None
    tried = f" (also tried {len(logs) - 1} older log(s))" if len(logs) > 1 else ""
    return _result(seed, reason=f"{newest.reason}: {newest.path}{tried}")


def _result(seed: SeedDir, **fields: object) -> Result:
    return Result(
        seed.protocol, seed.trainer, seed.config, seed.dataset, seed.role, seed.shots, seed.seed,
        str(seed.path), **fields,  # type: ignore[arg-type]
    )


def read_seed_dir(seed: SeedDir) -> Result:
    """The result of one seed folder: its valid ``result.json``, else its newest valid log."""
    return _from_record(seed) or _from_logs(seed)


def canonical_trainer(name: str) -> str:
    """Registered trainer class name for a CLI alias (case-insensitive); unknown names unchanged."""
    return TRAINER_ALIASES.get(name.lower(), name)


def _matches(value: str, wanted: Iterable[str] | None, *, fold_case: bool) -> bool:
    if wanted is None:
        return True
    if fold_case:
        return value.lower() in {w.lower() for w in wanted}
    return value in set(wanted)


def collect(
    root: str | Path,
    protocol: str,
    *,
    trainers: Sequence[str] | None = None,
    configs: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    shots: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    source: str = XD_SOURCE,
) -> list[Result]:
    """One Result per seed folder of ``protocol`` under ``root`` that passes the filters
    (cross-dataset / DG: runs trained on ``source``).

    Trainers match case-insensitively, through the CLI aliases. The source dataset of cross-dataset
    and domain-generalisation runs is kept whatever ``datasets`` says (it filters the targets).
    """
    wanted_trainers = None if trainers is None else [canonical_trainer(t) for t in trainers] + list(trainers)
    selected = [
        seed
        for seed in discover(root, protocol, source)
        if _matches(seed.trainer, wanted_trainers, fold_case=True)
        and _matches(seed.config, configs, fold_case=False)
        and (seed.role == ROLE_SOURCE or _matches(seed.dataset, datasets, fold_case=False))
        and (shots is None or seed.shots in shots)
        and (seeds is None or seed.seed in seeds)
    ]
    results = [read_seed_dir(seed) for seed in selected]
    logger.info("%s: %d seed folder(s), %d with a result", protocol, len(results), sum(r.ok for r in results))
    return results
