"""Stop a training run cleanly on a cluster's signal, and say so with an exit status.

``train.py`` catches :data:`STOP_SIGNALS` while it trains: the step in progress finishes, a resumable
checkpoint of that point is written (see ``trainers/base.py``: the step-granular checkpoint), and the
process exits with :data:`EXIT_RESUMABLE`. Re-running the same command resumes from it and ends
bit-identical to an uninterrupted run.

* ``SIGUSR1``: what ``sbatch --signal=B:USR1@<margin>`` sends ``margin`` seconds before the time
  limit. The SLURM job (``python -m spotlighter.run job``) forwards it to ``train.py`` and, when
  ``train.py`` exits with :data:`EXIT_RESUMABLE`, requeues itself (``scontrol requeue``).
  A SIGUSR1 that arrives before the process has trained a step is ignored (with a warning): stopping
  there would requeue a job that makes no progress (SLURM can repeat the warning right after it
  restarts a requeued job).
* ``SIGTERM``: preemption, ``scancel`` or the time limit itself. The checkpoint is written the same way;
  whether the job comes back is SLURM's decision (a preempted job submitted with ``--requeue`` does).

Plain Python (no torch, no Dassl): the runner imports it too.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

#: The signals that stop a run at the next step boundary (with a checkpoint).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: The signal after which the SLURM job requeues itself (sent by ``--signal=B:USR1@<margin>``).
REQUEUE_SIGNAL = signal.SIGUSR1
#: Exit status of a run stopped by a stop signal after writing a resumable checkpoint: sysexits.h's
#: EX_TEMPFAIL ("temporary failure; the user is invited to retry").
EXIT_RESUMABLE = 75

_received: Optional[int] = None


class Stopped(Exception):
    """Training stopped on a stop signal; the message names the signal and the checkpoint."""


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def requested() -> Optional[int]:
    """The first stop signal received since :func:`handling` began (None if none)."""
    return _received


def clear() -> None:
    """Forget the stop signal received (one that is ignored)."""
    global _received
    _received = None


def _handler(signum, _frame) -> None:
    global _received
    if _received is None:
        _received = signum


@contextmanager
def handling() -> Iterator[None]:
    """Catch :data:`STOP_SIGNALS` (main thread only) for the duration; the previous handlers are
    restored afterwards. DataLoader workers forked meanwhile inherit the handler, so a SIGTERM sent
    to every process of a SLURM job does not kill them before the checkpoint is written."""
    global _received
    _received = None
    if threading.current_thread() is not threading.main_thread():  # Python handles signals there only
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _received = None
