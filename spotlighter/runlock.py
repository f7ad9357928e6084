"""An exclusive lock on a run's output folder, held for the whole life of the process.

Two ``train.py`` processes writing into one output folder corrupt each other's checkpoints, logs
and ``result.json``. :class:`OutputLock` takes an OS-level file lock (``filelock``; ``flock`` on
POSIX) on ``<output_dir>/.lock`` and records who holds it (pid, host, start time, command) in
``<output_dir>/.lock.json``. The kernel releases the lock when its process dies, however it dies,
so a lock left behind by a killed run is never a deadlock: the next run takes it over and says so.

:func:`lock_holder` tells, without taking the lock, whether a live process holds a folder (the
protocol runner shows such a job as running instead of starting it twice).

Plain Python (no torch, no Dassl).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

from filelock import FileLock, Timeout

from .fileio import atomic_path

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
INFO_FILE = ".lock.json"
#: How long ``acquire`` waits for a lock that is held: covers :func:`lock_holder`'s brief probe.
ACQUIRE_WAIT_S = 2.0


@dataclass(frozen=True)
class LockHolder:
    pid: Optional[int]
    host: str
    started: str  # local time, "%Y-%m-%d %H:%M:%S"
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started} ({self.command})"


class OutputLocked(RuntimeError):
    """The output folder is held by another live process; ``holder`` says which."""

    def __init__(self, directory: str, holder: Optional[LockHolder]):
        self.directory = directory
        self.holder = holder
        who = holder.describe() if holder else "another process (no holder record)"
        super().__init__(
            f"{directory} is in use by {who}. Two runs in one output folder would overwrite each "
            "other's checkpoints, log and result.json: wait for it to finish, stop it, or give this "
            "run another --output-dir.")


def _read_holder(directory: str) -> Optional[LockHolder]:
    try:
        with open(os.path.join(directory, INFO_FILE)) as f:
            data = json.load(f)
        return LockHolder(pid=data.get("pid"), host=str(data.get("host", "?")),
                          started=str(data.get("started", "?")), command=str(data.get("command", "?")))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _this_process() -> LockHolder:
    return LockHolder(pid=os.getpid(), host=socket.gethostname(),
                      started=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv) or "python")


class OutputLock:
    """``with OutputLock(dir):`` or ``lock = OutputLock(dir).acquire()`` ... ``lock.release()``.

    After :meth:`acquire`, ``taken_over`` is the record of the dead process whose lock was taken
    over (None if the folder was free); it is logged as a warning unless ``announce`` is False
    (``train.py`` logs it itself once its log file is open).
    """

    def __init__(self, directory: str, announce: bool = True):
        self.directory = directory
        self.announce = announce
        self.taken_over: Optional[LockHolder] = None
        self._lock = FileLock(os.path.join(directory, LOCK_FILE), thread_local=False, is_singleton=False)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self) -> "OutputLock":
        os.makedirs(self.directory, exist_ok=True)
        try:
            self._lock.acquire(timeout=ACQUIRE_WAIT_S)
        except Timeout:
            raise OutputLocked(self.directory, _read_holder(self.directory)) from None
        previous = _read_holder(self.directory)
        if previous is not None and self.announce:  # the lock was free, so its last holder is gone
            logger.warning("Taking over the lock of %s left by a process that is no longer running (%s)",
                           self.directory, previous.describe())
        self.taken_over = previous
        try:
            with atomic_path(os.path.join(self.directory, INFO_FILE)) as tmp:
                with open(tmp, "w") as f:
                    json.dump(asdict(_this_process()), f)
        except BaseException:  # e.g. a full disk: do not keep a lock nobody can identify
            self._lock.release()
            raise
        return self

    def release(self) -> None:
        if not self._lock.is_locked:
            return
        try:
            os.remove(os.path.join(self.directory, INFO_FILE))
        except OSError:
            pass
        self._lock.release()

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(directory: str) -> Optional[LockHolder]:
    """The live process holding ``directory`` (holder record, or unknowns), or None if it is free.

    Never creates the folder; a free lock is left free (taken and given back at once).
    """
    if not os.path.isfile(os.path.join(directory, LOCK_FILE)):
        return None
    probe = FileLock(os.path.join(directory, LOCK_FILE), thread_local=False, is_singleton=False)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return _read_holder(directory) or LockHolder(pid=None, host="?", started="?", command="?")
    except OSError:  # unreadable folder: nobody we can see holds it
        return None
    probe.release()
    return None
