"""The output tree of CoOp-style codebases: its folder and file names, and the one place that builds
the path of a run's seed folder. The protocol runner (``spotlighter.run``) writes there and the
results tool (``spotlighter.results``) reads there, both through this module::

    ROOT/base2new/{train_base,test_new,train_all}/<dataset>/shots_<K>/<Trainer>/<cfg>/seed<S>
    ROOT/<source>/<Trainer>/<cfg>_<K>shots/seed<S>                          xd/dg: the trained model
    ROOT/<evaluation>/<Trainer>/<cfg>_<K>shots/<target>/seed<S>             xd/dg: its evaluations
    ROOT/teachers/<dataset>/<Trainer>/<cfg>_<K>shots/seed1                  a teacher trained in a graph
    ROOT/distilled/<target>/<Trainer>/<cfg>_<K>shots/seed<S>                xd: a distilling trainer's student
    ROOT/fewshot/<dataset>/<Trainer>/<cfg>_<K>shots/seed<S>                 few-shot (CoOp): all classes, K shots
    ROOT/fewshot/<dataset>/<Trainer>/<cfg>_0shots/seed<S>                   few-shot: a zero-shot model's evaluation

``<evaluation>`` is ``evaluation`` for ImageNet (CoOp's tree) and ``evaluation_from_<source>`` for
any other source. Paths are built from ``str`` roots with ``/`` (what the runner prints) and from
``pathlib`` roots with ``Path.joinpath``. Plain Python (no torch, no Dassl).
"""

from __future__ import annotations

from pathlib import PurePath
from typing import TypeVar, Union

from . import registry

# Roles of a seed folder. ``subset`` is what a result.json written there must say.
ROLE_BASE = "base"
ROLE_NEW = "new"
ROLE_ALL = "all"  # transductive base2new (PromptKD): the model distilled on all classes' unlabelled images
ROLE_SOURCE = "source"
ROLE_TARGET = "target"
ROLE_FEWSHOT = "fewshot"  # CoOp's few-shot protocol: trained on K shots of every class, tested on all classes
ROLE_SUBSET: dict[str, str] = {ROLE_BASE: "base", ROLE_NEW: "new", ROLE_SOURCE: "all", ROLE_TARGET: "all",
                               ROLE_FEWSHOT: "all"}

# Folder names (ecosystem.md, "Output tree users already have").
BASE2NEW_DIR = "base2new"
BASE2NEW_ROLE_DIRS: dict[str, str] = {ROLE_BASE: "train_base", ROLE_NEW: "test_new"}
#: A transductive trainer's base-to-novel model (PromptKD) is trained here; its base and new
#: evaluations are in BASE2NEW_ROLE_DIRS as usual.
TRAIN_ALL_DIR = "train_all"
XD_EVAL_DIR = "evaluation"
# Evaluations of a model trained on another source than ImageNet: never ImageNet's folders.
XD_EVAL_DIR_FROM = "evaluation_from_{source}"
SHOTS_DIR_PREFIX = "shots_"
SEED_DIR_PREFIX = "seed"
XD_CONFIG_SUFFIX = "shots"  # "<cfg>_<K>shots"
TEACHERS_DIR = "teachers"  # ROOT/teachers/<dataset>/<Trainer>/<cfg>_<K>shots/seed1: teachers trained in a graph
TEACHER_SEED = 1
DISTILLED_DIR = "distilled"
FEWSHOT_DIR = "fewshot"  # ROOT/fewshot/<dataset>/<Trainer>/<cfg>_<K>shots/seed<S>: CoOp's few-shot protocol
#: The shot count in the folder of a model that trains nothing (zero-shot CLIP): one evaluation per
#: dataset, whatever the shots (its result.json says shots null: the full training set was never used)
ZERO_SHOT_SHOTS = 0  # ROOT/distilled/<target>/...: cross-dataset students distilled on each target

# Files in a seed folder and the lines Dassl prints.
RESULT_FILE = "result.json"
LOG_FILE = "log.txt"
LOG_TIMESTAMP_FORMAT = "%Y-%m-%d-%H-%M-%S"  # Dassl: log.txt-<time.strftime(...)>
FINISH_SIGNAL = "Finish training"
RESULT_SIGNAL = "=> result"
EPOCH_PATTERN = r"epoch \[\d+/\d+\]"

Root = TypeVar("Root", str, PurePath)


def _join(root: Root, *parts: str) -> Root:
    if isinstance(root, PurePath):
        return root.joinpath(*parts)
    return "/".join((root, *parts))


def transfer_dirs(source: str) -> tuple[str, str]:
    """Training and evaluation folders of cross-dataset / DG runs from ``source``: ``imagenet`` and
    ``evaluation`` for ImageNet (CoOp's tree), ``<source>`` and ``evaluation_from_<source>`` otherwise."""
    return source, XD_EVAL_DIR if source == registry.DEFAULT_SOURCE else XD_EVAL_DIR_FROM.format(source=source)


def seed_dir_name(seed: Union[int, str]) -> str:
    return f"{SEED_DIR_PREFIX}{seed}"


def config_dir_name(config: str, shots: Union[int, str]) -> str:
    """``<cfg>_<K>shots``: the config folder of cross-dataset, DG and teacher runs."""
    return f"{config}_{shots}{XD_CONFIG_SUFFIX}"


def base2new_top(root: Root) -> Root:
    """``ROOT/base2new``: the folder of every base-to-novel run."""
    return _join(root, BASE2NEW_DIR)


def base2new_seed_dir(top: Root, role: str, dataset: str, shots: Union[int, str], trainer: str, config: str,
                      seed: Union[int, str]) -> Root:
    """A base-to-novel seed folder under ``top`` (:func:`base2new_top`); role ``all`` is ``train_all``."""
    role_dir = TRAIN_ALL_DIR if role == ROLE_ALL else BASE2NEW_ROLE_DIRS[role]
    return _join(top, role_dir, dataset, f"{SHOTS_DIR_PREFIX}{shots}", trainer, config, seed_dir_name(seed))


def source_seed_dir(root: Root, source: str, trainer: str, config: str, shots: Union[int, str],
                    seed: Union[int, str]) -> Root:
    """The seed folder of a model trained on ``source`` for cross-dataset and DG evaluation."""
    return _join(root, transfer_dirs(source)[0], trainer, config_dir_name(config, shots), seed_dir_name(seed))


def target_config_dir(root: Root, source: str, trainer: str, config: str, shots: Union[int, str]) -> Root:
    """The folder holding one ``<target>/seed<S>`` folder per evaluation of a model trained on ``source``."""
    return _join(root, transfer_dirs(source)[1], trainer, config_dir_name(config, shots))


def target_seed_dir(root: Root, source: str, trainer: str, config: str, shots: Union[int, str], target: str,
                    seed: Union[int, str]) -> Root:
    return _join(target_config_dir(root, source, trainer, config, shots), target, seed_dir_name(seed))


def teacher_seed_dir(root: Root, dataset: str, trainer: str, config: str, shots: Union[int, str]) -> Root:
    """One teacher per dataset (and shots), shared by every seed and student: trained with TEACHER_SEED."""
    return _join(root, TEACHERS_DIR, dataset, trainer, config_dir_name(config, shots), seed_dir_name(TEACHER_SEED))


def distilled_seed_dir(root: Root, target: str, trainer: str, config: str, shots: Union[int, str],
                       seed: Union[int, str]) -> Root:
    """Cross-dataset with a distilling trainer: the student distilled on ``target``'s unlabelled train split."""
    return _join(root, DISTILLED_DIR, target, trainer, config_dir_name(config, shots), seed_dir_name(seed))


def fewshot_top(root: Root) -> Root:
    """``ROOT/fewshot``: the folder of every few-shot run."""
    return _join(root, FEWSHOT_DIR)


def fewshot_seed_dir(root: Root, dataset: str, trainer: str, config: str, shots: Union[int, str],
                     seed: Union[int, str]) -> Root:
    """A few-shot seed folder (CoOp's ``<dataset>/<Trainer>/<cfg>_<K>shots/seed<S>`` under ROOT/fewshot);
    shots ZERO_SHOT_SHOTS for a zero-shot model's evaluation."""
    return _join(fewshot_top(root), dataset, trainer, config_dir_name(config, shots), seed_dir_name(seed))
