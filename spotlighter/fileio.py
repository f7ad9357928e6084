"""Atomic file writes with ordinary permissions (no torch, no Dassl)."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator, List

#: Marks the temporary files of :func:`atomic_path`: ``<name>.tmp-<host>-<pid>-<random>``.
TEMP_MARK = ".tmp-"
#: A temporary file of another host (or of a process this host cannot identify) is removed once
#: it is this old: no write takes a day, so its writer was killed.
STALE_TEMP_SECONDS = 24 * 3600


def default_file_mode() -> int:
    """What ``open(path, "w")`` would give: 0o666 minus the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _host() -> str:
    return socket.gethostname().split(".")[0].replace("-", "_") or "host"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(path: str, now: float | None = None) -> List[str]:
    """Remove the temporary files of ``path`` that a killed writer left behind (its process is gone
    on this host, or the file is older than :data:`STALE_TEMP_SECONDS`); return their paths."""
    folder = os.path.dirname(path) or "."
    start = os.path.basename(path) + TEMP_MARK
    try:
        names = [n for n in os.listdir(folder) if n.startswith(start)]
    except OSError:
        return []
    now = time.time() if now is None else now
    removed = []
    for name in names:
        full = os.path.join(folder, name)
        parts = name[len(start):].rsplit("-", 2)  # host, pid, mkstemp's random letters
        stale = len(parts) == 3 and parts[0] == _host() and parts[1].isdigit() and not _process_alive(int(parts[1]))
        try:
            stale = stale or now - os.lstat(full).st_mtime > STALE_TEMP_SECONDS
            if stale:
                os.remove(full)
                removed.append(full)
        except OSError:  # gone already (its writer finished), or not ours to remove
            continue
    return removed


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (readable like a
    normally created file, e.g. by other users of a shared $DATA), on error it is removed: an
    interrupted write never leaves a truncated file behind. Temporary files of ``path`` left by a
    killed writer are removed first (:func:`remove_stale_temps`)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(path)}{TEMP_MARK}{_host()}-{os.getpid()}-", dir=folder)
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
    if "Weights only load failed" in text:
        import re

        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:  # torch names the refused global in words that vary between its versions
            return (f"a pickle of Python objects, not plain tensors: it names the global {found.group(1)}, which a "
                    "weights-only file may not (it was not loaded, because unpickling objects can run code)")
        if zipfile.is_zipfile(path):
            reason = next((ln.strip() for ln in text.splitlines()[1:] if ln.strip()), "")
            return (f"a pickle that the weights-only reader refuses ({reason.rstrip('.')}): it was not loaded, "
                    "because unpickling objects can run code")
    zip_like = head == b"PK\x03\x04"
    if (zip_like and (not zipfile.is_zipfile(path) or not isinstance(exc, ImportError))) \
            or (head[:1] == b"\x80" and isinstance(exc, (EOFError, OSError, ValueError, IndexError))):
        return (f"truncated or corrupt ({size:,} bytes; cut short by a killed copy or a full disk, or "
                "damaged)")
    return f"not a torch file ({size:,} bytes that torch cannot parse)"
