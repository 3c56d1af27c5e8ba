"""CPU threads that fit the machine: the CPUs this process may use, minus what other processes keep busy.

Torch starts one intra-op thread per core. When another process already keeps a core busy (a
browser, a second job, a shared 2-vCPU Space), those threads spin against it and small models
run 7-16x slower than with fewer threads. :func:`choose_threads` picks
``CPUs available - CPUs busy`` (at least 1) from the scheduler's load average, unless told: the
``--threads`` flag of every command, or ``TLORA_THREADS`` in the environment (the Gradio app).
"""

from __future__ import annotations

import math
import os
from typing import Optional

__all__ = ["available_cpus", "busy_cpus", "choose_threads", "apply_threads", "THREADS_ENV"]

#: Environment variable that sets the thread count for every entry point (``auto`` or a number).
THREADS_ENV = "TLORA_THREADS"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; a container's CPU quota where it is smaller)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:  # cgroup v2 quota, e.g. "200000 100000" = 2 CPUs
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def busy_cpus() -> float:
    """CPUs other processes keep busy now: the 1-minute load average (0 where the OS has none)."""
    try:
        return max(0.0, os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def choose_threads(requested: Optional[str] = None) -> int:
    """The torch thread count: ``requested`` (a number, or ``"auto"``/``None``), else ``TLORA_THREADS``, else
    the CPUs available minus the busy ones, rounded, at least 1."""
    value = requested if requested not in (None, "") else os.environ.get(THREADS_ENV, "auto")
    if str(value).strip().lower() != "auto":
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(f"threads must be a whole number >= 1 or 'auto', got {value!r}") from None
        if threads < 1:
            raise ValueError(f"threads must be a whole number >= 1 or 'auto', got {threads}")
        return threads
    cpus = available_cpus()
    return max(1, min(cpus, round(cpus - busy_cpus())))


def apply_threads(requested: Optional[str] = None) -> int:
    """:func:`choose_threads`, then ``torch.set_num_threads``; returns the count."""
    import torch

    threads = choose_threads(requested)
    torch.set_num_threads(threads)
    return threads
