"""Where each protocol's seed folders are found under a results root (the tree and its paths:
:mod:`spotlighter.output_tree`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..output_tree import (BASE2NEW_DIR, BASE2NEW_ROLE_DIRS, ROLE_FEWSHOT, ROLE_SOURCE, ROLE_TARGET,
                           SEED_DIR_PREFIX, SHOTS_DIR_PREFIX, XD_CONFIG_SUFFIX, base2new_seed_dir, base2new_top,
                           fewshot_seed_dir, fewshot_top, source_seed_dir, target_seed_dir, transfer_dirs)
from .constants import DG_TARGETS_BY_SOURCE, PROTOCOLS, XD_SOURCE

_SEED_RE = re.compile(rf"^{SEED_DIR_PREFIX}(\d+)$")
_SHOTS_RE = re.compile(rf"^{SHOTS_DIR_PREFIX}(\d+)$")
_XD_CONFIG_RE = re.compile(rf"^(.+)_(\d+){XD_CONFIG_SUFFIX}$")


@dataclass(frozen=True)
class SeedDir:
    """One seed folder and what its place in the tree says about it."""

    protocol: str
    trainer: str
    config: str
    dataset: str
    role: str
    shots: int
    seed: int
    path: Path


def check_protocol(protocol: str) -> None:
    """ValueError for an unknown protocol name."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def _seeds(config_dir: Path) -> Iterator[tuple[int, Path]]:
    for seed_dir in _subdirs(config_dir):
        match = _SEED_RE.match(seed_dir.name)
        if match:
            yield int(match.group(1)), seed_dir


def find_base2new_top(root: Path) -> Path:
    """``ROOT/base2new``; ROOT itself when it already is that folder."""
    if not (root / BASE2NEW_DIR).is_dir() and any((root / d).is_dir() for d in BASE2NEW_ROLE_DIRS.values()):
        return root
    return base2new_top(root)


def _discover_base2new(root: Path) -> Iterator[SeedDir]:
    top = find_base2new_top(root)
    for role, role_dir in BASE2NEW_ROLE_DIRS.items():
        for dataset_dir in _subdirs(top / role_dir):
            for shots_dir in _subdirs(dataset_dir):
                shots = _SHOTS_RE.match(shots_dir.name)
                if not shots:
                    continue
                for trainer_dir in _subdirs(shots_dir):
                    for config_dir in _subdirs(trainer_dir):
                        for seed, path in _seeds(config_dir):
                            yield SeedDir(
                                "base2new", trainer_dir.name, config_dir.name, dataset_dir.name,
                                role, int(shots.group(1)), seed, path,
                            )


def _xd_configs(trainer_dir: Path) -> Iterator[tuple[str, int, Path]]:
    for config_dir in _subdirs(trainer_dir):
        match = _XD_CONFIG_RE.match(config_dir.name)
        if match:
            yield match.group(1), int(match.group(2)), config_dir


def _is_protocol_target(protocol: str, dataset: str, source: str = XD_SOURCE) -> bool:
    return (dataset in DG_TARGETS_BY_SOURCE.get(source, ())) == (protocol == "dg") and dataset != source


def _discover_transfer(root: Path, protocol: str, source: str = XD_SOURCE) -> Iterator[SeedDir]:
    train_dir, eval_dir = transfer_dirs(source)
    for trainer_dir in _subdirs(root / train_dir):
        for config, shots, config_dir in _xd_configs(trainer_dir):
            for seed, path in _seeds(config_dir):
                yield SeedDir(protocol, trainer_dir.name, config, source, ROLE_SOURCE, shots, seed, path)
    for trainer_dir in _subdirs(root / eval_dir):
        for config, shots, config_dir in _xd_configs(trainer_dir):
            for target_dir in _subdirs(config_dir):
                if not _is_protocol_target(protocol, target_dir.name, source):
                    continue
                for seed, path in _seeds(target_dir):
                    yield SeedDir(protocol, trainer_dir.name, config, target_dir.name, ROLE_TARGET, shots, seed, path)


def _discover_fewshot(root: Path) -> Iterator[SeedDir]:
    for dataset_dir in _subdirs(fewshot_top(root)):
        for trainer_dir in _subdirs(dataset_dir):
            for config, shots, config_dir in _xd_configs(trainer_dir):
                for seed, path in _seeds(config_dir):
                    yield SeedDir("fewshot", trainer_dir.name, config, dataset_dir.name, ROLE_FEWSHOT, shots, seed,
                                  path)


def discover(root: str | Path, protocol: str, source: str = XD_SOURCE) -> list[SeedDir]:
    """Every seed folder of ``protocol`` under the output root (xd/dg: trained on ``source``)."""
    check_protocol(protocol)
    root = Path(root)
    if protocol == "fewshot":
        return list(_discover_fewshot(root))
    found = _discover_base2new(root) if protocol == "base2new" else _discover_transfer(root, protocol, source)
    return list(found)


def seed_dir_path(
    root: str | Path, protocol: str, trainer: str, config: str, dataset: str, role: str, shots: int, seed: int,
    source: str = XD_SOURCE,
) -> Path:
    """Where the seed folder of one run lives (whether or not it exists)."""
    root = Path(root)
    if protocol == "fewshot":
        return fewshot_seed_dir(root, dataset, trainer, config, shots, seed)
    if protocol == "base2new":
        return base2new_seed_dir(find_base2new_top(root), role, dataset, shots, trainer, config, seed)
    if role == ROLE_SOURCE:
        return source_seed_dir(root, source, trainer, config, shots, seed)
    return target_seed_dir(root, source, trainer, config, shots, dataset, seed)


def search_patterns(root: str | Path, protocol: str, source: str = XD_SOURCE) -> list[str]:
    """The folder patterns searched for ``protocol``, for messages."""
    check_protocol(protocol)
    root = Path(root)
    if protocol == "fewshot":
        return [str(fewshot_top(root) / "<dataset>" / "<Trainer>" / f"<cfg>_<K>{XD_CONFIG_SUFFIX}"
                    / f"{SEED_DIR_PREFIX}<S>")]
    if protocol == "base2new":
        top = find_base2new_top(root)
        return [
            str(top / role_dir / "<dataset>" / f"{SHOTS_DIR_PREFIX}<K>" / "<Trainer>" / "<cfg>"
                / f"{SEED_DIR_PREFIX}<S>")
            for role_dir in BASE2NEW_ROLE_DIRS.values()
        ]
    targets = "<" + "|".join(DG_TARGETS_BY_SOURCE.get(source, ())) + ">" if protocol == "dg" else "<target>"
    config_name = f"<cfg>_<K>{XD_CONFIG_SUFFIX}"
    train_dir, eval_dir = transfer_dirs(source)
    return [
        str(root / train_dir / "<Trainer>" / config_name / f"{SEED_DIR_PREFIX}<S>"),
        str(root / eval_dir / "<Trainer>" / config_name / targets / f"{SEED_DIR_PREFIX}<S>"),
    ]
