"""Facts about this machine that figures depend on (plain Python: no torch).

Kernels round differently on different CPU kinds, so the small CLIP MiniBench pretrains, and every
timing, say which CPU they came from (:func:`cpu_name`); :func:`cores` is what jobs may share."""

from __future__ import annotations

import os
import platform

CPUINFO = "/proc/cpuinfo"


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere platform.processor())."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
