"""Dassl-style logs as CoOp, MaPLe and the official Spotlighter code write them, for tests and demos.

Nothing here runs a model: it only writes text in the formats the parser reads.
"""

from __future__ import annotations

from pathlib import Path

from ..output_tree import FINISH_SIGNAL, LOG_FILE, RESULT_SIGNAL

# "coop": Dassl of 2021 (CoOp/CoCoOp): tab-separated iteration lines, two-decimal percentages, no validation.
# "maple": current Dassl (MaPLe, PromptSRC): "epoch [e/E] batch [b/B]" lines, one decimal.
# "spotlighter": the official Spotlighter repository: current Dassl with validation after every epoch and
#                the best-val model deployed for the final test.
STYLES = ("coop", "maple", "spotlighter")
_DECIMALS = {"coop": 2, "maple": 1, "spotlighter": 1}
_VALIDATES = {"coop": False, "maple": False, "spotlighter": True}


def result_block(correct: int, total: int, *, decimals: int = 1, macro_f1: float | None = None) -> str:
    """The evaluator's ``=> result`` block."""
    acc = 100.0 * correct / total
    f1 = acc - 0.4 if macro_f1 is None else macro_f1
    return (
        f"{RESULT_SIGNAL}\n* total: {total:,}\n* correct: {correct:,}\n* accuracy: {acc:.{decimals}f}%\n"
        f"* error: {100 - acc:.{decimals}f}%\n* macro_f1: {f1:.{decimals}f}%\n"
    )


def _header(trainer: str, dataset: str) -> str:
    return (
        "***************\n** Arguments **\n***************\n"
        f"trainer: {trainer}\n************\n** Config **\n************\n"
        f"DATASET:\n  NAME: {dataset}\n  NUM_SHOTS: 16\nOPTIM:\n  MAX_EPOCH: 2\n"
        f"Loading trainer: {trainer}\nLoading dataset: {dataset}\n"
    )


def _iteration(style: str, epoch: int, epochs: int) -> str:
    if style == "coop":
        return (f"epoch [{epoch}/{epochs}][1/1]\ttime 0.894 (0.894)\tdata 0.407 (0.407)\teta 0:00:44\t"
                "loss 1.4219 (1.4219)\tacc 62.5000 (62.5000)\tlr 2.000000e-03\n")
    return (f"epoch [{epoch}/{epochs}] batch [20/78] time 0.102 (0.227) data 0.000 (0.012) "
            "loss 1.5127 (1.4512) lr 1.0000e-05 eta 0:01:23\n")


def train_log(
    correct: int,
    total: int,
    *,
    style: str = "maple",
    trainer: str = "MaPLe",
    dataset: str = "oxford_pets",
    epochs: int = 2,
    val: tuple[int, int] = (50, 64),
    finished: bool = True,
) -> str:
    """A training log; its test block (``correct``/``total``) follows ``Finish training`` when ``finished``."""
    decimals = _DECIMALS[style]
    text = _header(trainer, dataset)
    for epoch in range(1, epochs + 1):
        text += _iteration(style, epoch, epochs)
        if _VALIDATES[style]:
            text += "Evaluate on the *val* set\n" + result_block(*val, decimals=decimals)
            text += "Checkpoint saved to output/prompt_learner/model-best.pth.tar\n"
    if not finished:
        return text
    deploy = "Deploy the model with the best val performance" if _VALIDATES[style] else "Deploy the last-epoch model"
    return (text + f"{FINISH_SIGNAL}\n{deploy}\nEvaluate on the *test* set\n"
            + result_block(correct, total, decimals=decimals) + "Elapsed: 0:01:43\n")


def eval_log(correct: int, total: int, *, style: str = "maple", trainer: str = "MaPLe",
             dataset: str = "oxford_pets") -> str:
    """An ``--eval-only`` log (no training iterations)."""
    return (_header(trainer, dataset)
            + 'Loading weights to prompt_learner from "output/prompt_learner/model.pth.tar-2" (epoch = 2)\n'
            + "Evaluate on the *test* set\n" + result_block(correct, total, decimals=_DECIMALS[style]))


def write_log(seed_dir: str | Path, text: str, timestamp: str | None = None) -> Path:
    """Write ``log.txt`` (or the re-run name ``log.txt-<timestamp>``) into ``seed_dir``."""
    path = Path(seed_dir) / (LOG_FILE if timestamp is None else f"{LOG_FILE}-{timestamp}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
