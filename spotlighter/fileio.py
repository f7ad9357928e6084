"""Atomic file writes with ordinary permissions (no torch, no Dassl)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterator


def default_file_mode() -> int:
    """What ``open(path, "w")`` would give: 0o666 minus the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (readable like a
    normally created file, e.g. by other users of a shared $DATA), on error it is removed: an
    interrupted write never leaves a truncated file behind."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
