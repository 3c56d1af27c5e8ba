"""CPU threads that fit the machine: the CPUs this process may use, minus what other processes keep busy.

Torch starts one intra-op thread per core. When another process already keeps a core busy (a
browser, a second job, a shared 2-vCPU Space), those threads spin against it and small models
run 7-16x slower than with fewer threads. :func:`choose_threads` picks
``CPUs available - CPUs busy`` (at least 1), the busy ones measured over a tenth of a second at
start (:func:`busy_cpus`), unless told: the
``--threads`` flag of every command, or ``TLORA_THREADS`` in the environment (the Gradio app).
"""

from __future__ import annotations

import math
import os
from typing import Optional

__all__ = ["available_cpus", "busy_cpus", "choose_threads", "apply_threads", "THREADS_ENV"]

#: Environment variable that sets the thread count for every entry point (``auto`` or a number).
THREADS_ENV = "TLORA_THREADS"


def _affinity() -> set[int]:
    """The CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def _cgroup(name: str) -> str:
    with open(f"/sys/fs/cgroup/{name}") as f:
        return f.read()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; a container's CPU quota where it is smaller)."""
    cpus = len(_affinity())
    try:  # cgroup v2 quota, e.g. "200000 100000" = 2 CPUs
        quota, period = _cgroup("cpu.max").split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _cgroup_usage() -> Optional[float]:
    """CPU seconds used by this container (cgroup v2) when it has a CPU quota; ``None`` otherwise."""
    try:
        if _cgroup("cpu.max").split()[0] == "max":
            return None
        for line in _cgroup("cpu.stat").splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cpu_jiffies(cpus: set[int]) -> Optional[tuple[int, int]]:
    """(busy, total) jiffies of ``cpus`` from ``/proc/stat``; ``None`` off Linux."""
    busy = total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
                    continue
                values = [int(x) for x in fields[:8]]  # guest time is already counted in user
                idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
                busy += sum(values) - idle
                total += sum(values)
    except (OSError, ValueError):
        return None
    return (busy, total) if total else None


def busy_cpus(window: float = 0.1) -> float:
    """CPUs other processes keep busy now, measured over ``window`` seconds while this process sleeps, so a
    job that just ended does not count (as it would in the 1-minute load average): in a container with a
    CPU quota, the container's own usage (cgroup v2); else the CPUs this process may run on (``/proc/stat``);
    else the load average; 0 where the OS offers none of them."""
    import time

    used = _cgroup_usage()
    if used is not None:
        time.sleep(window)
        after = _cgroup_usage()
        if after is not None:
            return max(0.0, (after - used) / window)
    cpus = _affinity()
    before = _cpu_jiffies(cpus)
    if before is not None:
        time.sleep(window)
        after = _cpu_jiffies(cpus)
        if after is not None and after[1] > before[1]:
            return max(0.0, (after[0] - before[0]) / (after[1] - before[1]) * len(cpus))
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
