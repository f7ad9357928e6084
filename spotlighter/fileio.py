"""Atomic file writes with ordinary permissions (no torch, no Dassl)."""

from __future__ import annotations

import errno
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


#: errno values that mean "this folder cannot take the file", not a bug: say so in one line.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class OutputWriteError(OSError):
    """A file of the output folder (log, checkpoint, result) cannot be written; says what to do."""

    @staticmethod
    def is_write_error(exc: BaseException) -> bool:
        return isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS

    @classmethod
    def from_os_error(cls, exc: OSError, what: str = "") -> "OutputWriteError":
        name = exc.filename or what or "a file of the output folder"
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free space on that file system (or raise the quota), or give another --output-dir"
        elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            fix = "give a --output-dir on a writable file system that you may write to"
        else:
            fix = "check that folder, or give another --output-dir"
        return cls(f"cannot write {name} ({reason}): {fix}.")


def describe_unreadable(path: str, exc: BaseException) -> str:
    """What is wrong with a torch file that ``torch.load``/``torch.jit.load`` refused, in words
    (never torch's advice to load it with ``weights_only=False``, which would run its code)."""
    import zipfile

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    text = str(exc)
    if size == 0:
        return "empty (0 bytes): it was never written completely"
    if "Weights only load failed" in text and "Unsupported global" in text:
        return ("a pickle of Python objects, not plain tensors: it was not loaded, because "
                "unpickling objects can run code")
    zip_like = head == b"PK\x03\x04"
    if (zip_like and (not zipfile.is_zipfile(path) or not isinstance(exc, ImportError))) \
            or (head[:1] == b"\x80" and isinstance(exc, (EOFError, OSError, ValueError, IndexError))):
        return (f"truncated or corrupt ({size:,} bytes; cut short by a killed copy or a full disk, or "
                "damaged)")
    return f"not a torch file ({size:,} bytes that torch cannot parse)"
